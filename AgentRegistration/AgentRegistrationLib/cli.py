"""``agentreg``: the engine's command line (ground truth, SDM, training, registration, ...).

Every command prints a progress bar (tqdm, on stderr); with ``--progress-json`` it prints one
JSON line per step on stdout instead, which the Slicer modules read. User errors end with one
line ``agentreg: error: ...`` (or ``{"stage": "error", ...}``) and exit code 1.

The command line only parses arguments, calls the stage that does the work and prints. Each command imports its
stage inside its function: the stages import torch, SimpleITK or itk (seconds), and ``agentreg --help``, the
input checks of ``register`` (before any model is loaded) and the Slicer worker's start must not wait for the
ones they do not use.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from . import protocol
from .files import atomic_write
from .paths import recorded_path, repo_file, shown


class Reporter:
    """Progress on stderr (tqdm) or as JSON lines on stdout, in the format of ``protocol`` (messages)."""

    def __init__(self, stage: str, total: int, json_lines: bool, delay: float = 0.0):
        self.json_lines = json_lines
        self.delay = delay  # seconds before a bar appears (a quick stage shows none)
        self.bar = None
        self.begin(stage, total, announce=False)

    def begin(self, stage: str, total: int, announce: bool = True) -> None:
        """Start reporting ``stage`` (``total`` units; 0: one piece of work of unknown length, shown as busy)."""
        self.close()
        self.stage, self.total = stage, total
        if self.json_lines:
            if announce:
                print(protocol.encode(protocol.progress_message(stage, 0, total)), flush=True)
        elif total > 0:
            from tqdm import tqdm  # only for a bar on a terminal (not for the Slicer worker's JSON lines)
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, delay=self.delay)
        elif announce:
            print(f"{protocol.STAGE_TITLES.get(stage, stage)} ...", file=sys.stderr, flush=True)

    def update(self, done: int, **info) -> None:
        if self.json_lines:
            print(protocol.encode(protocol.progress_message(self.stage, done, self.total, **info)), flush=True)
        elif self.bar is not None:
            if info:
                self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in info.items()},
                                     refresh=False)
            self.bar.update(done - self.bar.n)  # shown at most every 0.1 s, and not before ``delay``

    def message(self, text: str) -> None:
        if self.json_lines:
            print(protocol.encode(protocol.text_message(self.stage, text)), flush=True)
        else:
            (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


STEP_CHOICE_PAIRS = 24  # 'agentreg train': real training pairs on which a new model's default steps are chosen
MAX_FAILED_FRACTION = 0.10  # 'agentreg groundtruth' fails when more pairs fail (or a subject loses all its pairs)


def _subject_names(args) -> list[str] | None:
    from .dataset import load_split

    if args.subjects:
        return args.subjects.split(",")
    if args.split:
        return load_split(args.split)[args.subset]
    return None


def _labels_of(subjects) -> list:
    """The subjects' label maps, read once; an error naming every subject whose label is empty."""
    from .image_io import label_voxels, read_label

    labels = [read_label(s.label, f"label of {s.name}") for s in subjects]
    empty = [s.name for s, label in zip(subjects, labels, strict=True) if not label_voxels(label)]
    if empty:
        raise ValueError(f"the label of {', '.join(empty)} is empty: fix it or leave the subject out (--subjects or "
                         "another --split)")
    return labels


def _numbers(kind: type, option: str, counts: tuple[int, ...] = (2, 3)):
    """An argparse type: :func:`protocol.parse_numbers` of ``kind``, naming ``option`` when wrong."""

    def parse(text: str) -> tuple:
        try:
            return protocol.parse_numbers(text, kind, option, counts)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _listed(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)


# ----------------------------------------------------------------------------------------- groundtruth
def cmd_groundtruth(args) -> int:
    from . import groundtruth
    from .dataset import find_subjects
    from .preprocessing import model_geometry, model_voxel_size

    subjects = find_subjects(args.data, _subject_names(args))
    labels = _labels_of(subjects)  # read once: geometry, voxel size
    geometry = model_geometry(args.dim, args.crop, args.geometry, labels, args.grid_size, args.control_spacing,
                              args.box_spreads, args.control_spacing_mm)
    voxel = model_voxel_size(geometry, labels)
    print(f"model {geometry.description()}; a model voxel spans {_listed(voxel)} and the control spacing "
          f"{_listed(np.multiply(voxel, geometry.control_spacing))} in the images' physical units (median over the "
          f"{len(labels)} training masks)", file=sys.stderr)
    template = next((s for s in subjects if s.name == args.template), subjects[0]) if args.template else subjects[0]
    pairs = groundtruth.ordered_pairs([s.name for s in subjects], args.max_pairs, args.seed)
    rep = Reporter("preprocess", len(subjects), args.progress_json)

    def pair_done(done, total, result, error):
        if rep.stage != "groundtruth":
            rep.begin("groundtruth", len(pairs), announce=False)
        if error:
            rep.message(error)
        rep.update(done, **({"dice": result.dice_after} if result else {}))

    out = Path(args.out)
    summary, _, _ = groundtruth.make_groundtruth(
        subjects, template, geometry, out, pairs, workers=args.workers,
        settings={"iterations": args.iterations, "resolutions": args.resolutions,
                  "metric": args.metric or protocol.default_gt_metric(geometry.choice)},
        max_pairs=args.max_pairs,
        seed=args.seed, source=groundtruth.data_record(args.data, args.subjects, args.split, args.subset),
        max_failed_fraction=MAX_FAILED_FRACTION, on_subject=rep.update, on_pair=pair_done, scheduler=args.scheduler,
        compare_elastix=args.compare_elastix)
    rep.close()
    lines, error = groundtruth.run_report(summary, out)
    print("\n".join(lines), file=sys.stderr)
    if error:
        raise ValueError(error)
    if args.progress_json:
        print(json.dumps({"stage": "done", "summary": summary.to_dict()}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- sdm
def cmd_sdm(args) -> int:
    from .groundtruth import GroundTruthSummary
    from .sdm_fitting import fit_from_groundtruth, reconstruction_report, write_report

    gt = Path(args.groundtruth)
    sdm, coefficients, results = fit_from_groundtruth(gt, args.modes)
    sdm.save(args.out)
    print(f"SDM with {args.modes} modes ({100 * sdm.explained_variance_ratio.sum():.1f} % of the variance) "
          f"from {len(results)} GT deformations saved to {args.out}; model "
          f"{GroundTruthSummary.load(gt).geometry.description()}", file=sys.stderr)
    modes = sorted({int(m) for m in args.report_modes.split(",")} | {args.modes}) if args.report_modes else [args.modes]
    table = reconstruction_report(gt, coefficients, results, modes)
    for row in table:
        print(f"d = {row['modes']:3d}: Dice loss of reconstruction mean {100 * row['loss_mean']:.2f} %, "
              f"median {100 * row['loss_median']:.2f} %, max {100 * row['loss_max']:.2f} %", file=sys.stderr)
    if args.report:
        write_report(Path(args.report), gt, table, "agentreg " + " ".join(sys.argv[1:]), sdm)
    if args.progress_json:
        print(json.dumps({"stage": "done", "reconstruction": table}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- localiser
def cmd_localiser(args) -> int:
    """Train the organ localiser that places the fixed crop of a model that crops on the organ."""
    from .dataset import find_subjects
    from .image_io import read_image
    from .localiser import LocaliserConfig, TrainingLog, organ_slices, save_localiser, train_localiser

    if args.minutes <= 0 or args.iterations <= 0:
        raise ValueError(f"--minutes and --iterations must be positive, not {args.minutes:g} and {args.iterations}")
    subjects = find_subjects(args.data, _subject_names(args))
    images, labels = [], []
    for s, label in zip(subjects, _labels_of(subjects), strict=True):
        image = read_image(s.image, f"image of {s.name}")
        if image.GetDimension() < args.dim:
            raise ValueError(f"{s.name} is a {image.GetDimension()}-D image: a {args.dim}-D localiser needs "
                             f"{args.dim}-D images (use --dim {image.GetDimension()})")
        cases = organ_slices(image, label) if image.GetDimension() > args.dim else [(image, label)]
        images += [c[0] for c in cases]
        labels += [c[1] for c in cases]
    if args.threads:
        _torch_threads(args.threads)
    rep = Reporter("localiser", 100, args.progress_json)  # per cent of the iterations or of the time, what ends first
    log = TrainingLog()

    def progress(iteration: int, loss: float, seconds: float) -> None:
        rep.update(min(100, int(100 * max(iteration / args.iterations, seconds / (60.0 * args.minutes)))), loss=loss)

    localiser = train_localiser(images, labels, LocaliserConfig.default(args.dim), iterations=args.iterations,
                                time_limit=60.0 * args.minutes, seed=args.seed, log=log, progress=progress)
    rep.close()
    record = {"subjects": [s.name for s in subjects], "data": recorded_path(args.data), "iterations": log.iterations,
              "seconds": round(log.seconds, 1), "seed": args.seed}
    save_localiser(localiser, args.out, {"training": record})
    print(f"organ localiser ({args.dim}-D) trained on {len(images)} {'slices' if args.dim == 2 else 'volumes'} of "
          f"{len(subjects)} subjects: {log.iterations} batches in {log.seconds / 60:.1f} min; saved to {args.out}. "
          f"Give it to 'agentreg train --localiser {args.out}'.", file=sys.stderr)
    if args.progress_json:
        print(json.dumps({"stage": "done", "localiser": str(args.out)}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from . import training
    from .bundle import resolve_device
    from .sdm import StatisticalDeformationModel
    from .sdm_fitting import load_groundtruth

    if args.split and not args.data:
        raise ValueError("--split needs --data: the data folder or CSV that holds the split's validation subjects")
    if args.step_pairs < 0:
        raise ValueError(f"--step-pairs must be 0 or more, not {args.step_pairs}")
    if args.init and not Path(args.init).is_file():
        raise ValueError(f"--init {args.init}: no such model file (give a model bundle made by agentreg train)")
    device = resolve_device(args.device)
    config = training.config_by_name(args.config).with_overrides(args.set or [])
    geometry, _ = load_groundtruth(Path(args.groundtruth))
    sdm = StatisticalDeformationModel.load(args.sdm)
    training_set = training.TrainingSet.from_groundtruth(Path(args.groundtruth))
    validation = None
    if args.data and args.split:
        validation = training.validation_pairs_from_split(Path(args.groundtruth), args.data, args.split, geometry,
                                                          config.validation_pairs, config.seed)
    if device.type == "cpu":
        _torch_threads(args.threads)
    rep = Reporter("train", config.iterations, args.progress_json)
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(args.out).with_suffix(".checkpoint.pt")
    bundle = training.train(config, training_set, sdm, geometry, Path(args.out), device, checkpoint, validation,
                            lambda i, n, info: rep.update(i, **info),
                            time_limit=None if args.max_minutes is None else 60.0 * args.max_minutes,
                            init=Path(args.init) if args.init else None)
    rep.close()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and writes)
        return 0
    if bundle.validation:
        bundle.validation.update(data=recorded_path(args.data), split=recorded_path(args.split))
    if args.step_pairs:
        rep = Reporter("agent", 0, args.progress_json)
        rep.message(f"choosing the model's default number of steps on {min(args.step_pairs, len(training_set.pairs))} "
                    "real pairs of training subjects (up to 200 steps each)")
        bundle.training["step_choice"] = training.choose_steps(bundle, training_set, args.step_pairs, device=device)
        rep.close()
    bundle.save(args.out)
    if geometry.localised:
        note = training.add_localisation(bundle, Path(args.out), args.localiser, args.data, training_set.names)
        if note:
            print(note, file=sys.stderr)
    print(training.training_text(config, bundle, args.out), file=sys.stderr)
    if args.progress_json:
        print(json.dumps({"stage": "done", "bundle": str(args.out)}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- register
def _point(text: str | None) -> np.ndarray | None:
    if not text:
        return None
    try:
        return np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise ValueError(f"--fixed-point {text!r}: give the point as comma-separated numbers, e.g. 12.5,-30,4") from None


def cmd_register(args) -> int:
    """Check every input first (nothing is loaded or written before), then read, localise or pre-align, crop,
    run the agent and write; each stage reports progress from its start."""
    from . import inputs

    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads {args.threads}: give a positive number of CPU threads, or 0 for torch's choice")
    if args.save_steps < 0:
        raise ValueError(f"--save-steps {args.save_steps}: give K > 0 to write the warped image every K steps, or 0")
    if args.steps is not None and args.steps < 0:
        inputs.agent_steps(args.steps, 0)  # the message; the model's default is added once it is loaded
    output_dir = inputs.check_output_dir(args.output_dir)
    fixed_point = _point(args.fixed_point)
    rep = Reporter("read", 3 + bool(args.fixed_label) + bool(args.moving_label), args.progress_json, delay=1.0)
    rep.update(0)
    given = inputs.read_register_inputs(args.fixed, args.moving, args.fixed_label, args.moving_label,
                                        args.resample_labels, on_read=lambda done, total: rep.update(done))
    from .bundle import load_bundle, resolve_device
    from .outputs import write_registration_outputs
    from .registration import Registrar

    _torch_threads(args.threads)
    device = resolve_device(args.device)
    bundle = load_bundle(args.model)
    rep.update(rep.total)
    inputs.check_model_dimension(bundle.dim, given.fixed.GetDimension(), args.model, args.fixed)
    steps, warning = inputs.agent_steps(args.steps, bundle.agent_settings().steps)
    for note in given.notes + ([warning] if warning else []):
        print(f"agentreg: warning: {note}", file=sys.stderr, flush=True)
        if args.progress_json:
            rep.message(f"warning: {note}")
    settings = bundle.agent_settings(steps=steps, seed=args.seed, fuzzy_k=args.fuzzy_k,
                                     stop_on_convergence=args.stop_on_convergence,
                                     fuzzy_action_control=not args.no_fuzzy)
    registrar = Registrar(bundle, device)
    rep.begin("localise" if bundle.geometry.localised else "prealign", 0)

    def agent_step(step: int, total: int) -> None:
        if rep.stage != "register":
            rep.begin("register", total)
        rep.update(step)
        if step == total:
            rep.begin("resample", 0)

    result = registrar.register(given.fixed, [given.moving], settings, given.fixed_label, [given.moving_label],
                                callback=agent_step, fixed_point=fixed_point)[0]
    rep.begin("write", 0)
    write_registration_outputs(result, output_dir, given.moving, bundle.sdm, bundle.geometry, given.fixed,
                               args.save_steps, title=f"{Path(args.moving).name} to {Path(args.fixed).name}",
                               step_limit=settings.steps)
    rep.close()
    m = result.metrics
    summary = f"registered in {m['seconds_total']:.2f} s (agent {m['seconds_agent']:.2f} s, {m['steps']} steps on {device})"
    if "dice_after" in m:
        summary += f"; Dice {m['dice_before']:.3f} -> {m['dice_after']:.3f}"
    print(summary + f"; outputs in {args.output_dir}", file=sys.stderr)
    if args.progress_json:
        print(protocol.encode(protocol.done_message(output_dir=str(args.output_dir), metrics=m)), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- register-many
def cmd_register_many(args) -> int:
    """Many pairs with one model load (the engine is :mod:`.cohort`); exit 1 only when every pair failed."""
    from . import inputs
    from .cohort import (
        FAILED,
        CohortOptions,
        is_fusion,
        multi_atlas_pairs,
        pairs_from_csv,
        register_cohort,
        summary_text,
    )

    atlases, labels = args.atlas or [], args.atlas_label or []
    if bool(args.pairs) == bool(atlases or args.patients):
        raise ValueError("give either --pairs CSV, or --atlas IMAGE with --patients FOLDER (and --atlas-label LABEL)")
    if labels and not atlases:
        raise ValueError("--atlas-label needs --atlas (the atlas image) and --patients")
    if not args.pairs and not (atlases and args.patients):
        raise ValueError(f"--{'patients' if atlases else 'atlas'} is missing: the atlas mode needs --atlas IMAGE and "
                         "--patients FOLDER")
    if len(labels) > len(atlases) or (len(atlases) > 1 and len(labels) != len(atlases)):
        raise ValueError(f"{len(atlases)} --atlas and {len(labels)} --atlas-label: give one label per atlas, in the "
                         "same order (--atlas A1 --atlas-label L1 --atlas A2 --atlas-label L2)")
    if args.steps is not None and args.steps < 0:
        inputs.agent_steps(args.steps, 0)
    options = CohortOptions(Path(args.model), args.batch_size, args.workers, args.threads, args.resample_labels,
                            args.save_steps, args.scheduler)
    output_dir = inputs.check_output_dir(args.output_dir)
    pairs = (pairs_from_csv(args.pairs) if args.pairs
             else multi_atlas_pairs(list(zip(atlases, labels + [None] * (len(atlases) - len(labels)), strict=True)),
                                    args.patients))
    from .bundle import load_bundle, resolve_device

    _torch_threads(args.threads)
    device = resolve_device(args.device)
    bundle = load_bundle(args.model)
    steps, warning = inputs.agent_steps(args.steps, bundle.agent_settings().steps)
    settings = bundle.agent_settings(steps=steps, seed=args.seed, fuzzy_k=args.fuzzy_k,
                                     stop_on_convergence=args.stop_on_convergence,
                                     fuzzy_action_control=not args.no_fuzzy)
    rep = Reporter("register", len(pairs), args.progress_json)
    if warning:
        rep.message(f"warning: {warning}")

    def progress(done: int, total: int, report) -> None:
        if report is not None and report.status == FAILED:
            rep.message(f"{report.pair.name}: failed: {report.message}")
        info = {"dice": report.metrics["dice_after"]} if report is not None and "dice_after" in report.metrics else {}
        rep.update(done, **info)

    reports = register_cohort(pairs, bundle, output_dir, settings, device, options, progress)
    rep.close()
    summary = output_dir / "summary.csv"
    print(f"register-many: {summary_text(reports)} ({steps} steps on {device}); summary in {summary}",
          file=sys.stderr)
    failed = [r for r in reports if r.status == FAILED and not is_fusion(r)]
    if len(failed) == len(pairs):
        raise ValueError(f"every pair failed (the first: {failed[0].pair.name}: {failed[0].message}); see {summary}")
    if args.progress_json:
        print(protocol.encode(protocol.done_message(output_dir=str(output_dir), summary=str(summary),
                                                    pairs=len(reports), failed=len(failed))), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from .bundle import load_bundle, model_card
    from .evaluation import file_hash

    bundle = load_bundle(args.model)
    evaluation = None
    if args.evaluation:
        evaluation = json.loads(Path(args.evaluation).read_text())
        if evaluation.get("model_hash") != file_hash(args.model):
            raise ValueError(f"{args.evaluation} was not made with {args.model} (another model file): run 'agentreg "
                             "evaluate' with this model first")
        evaluation["source"] = str(args.evaluation)
    card = model_card(bundle, args.name or Path(args.model).stem, evaluation)
    if args.card:
        atomic_write(args.card, lambda tmp: Path(tmp).write_text(card))
    print(card)
    return 0


# ----------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    from . import evaluation
    from .bundle import resolve_device
    from .dataset import find_subjects, load_split
    from .preprocessing import model_geometry

    methods = evaluation.parse_methods(args.methods)
    names = load_split(args.split)["validation"]
    subjects = {s.name: s for s in find_subjects(args.data, names)}
    pairs = evaluation.select_pairs(names, args.max_pairs, args.pairs, args.seed)
    model, bundle = evaluation.model_to_evaluate(args.model, args.dim, args.crop, methods)
    geometry = bundle.geometry if bundle else model_geometry(args.dim, args.crop or "paper")
    methods = evaluation.parse_methods(args.methods, geometry)
    steps = args.steps or (bundle.agent_settings().steps if bundle else 200)  # without ours / nfc: not used
    gt_metric = args.gt_metric or (bundle.groundtruth_metric if bundle else "points")
    settings = evaluation.EvaluationSettings(steps=steps, seed=args.agent_seed, iterations=args.iterations,
                                             gt_iterations=args.gt_iterations, gt_metric=gt_metric,
                                             batch_size=args.batch_size)
    device = resolve_device(args.device)
    _torch_threads(args.threads)
    bars: dict[str, Reporter] = {}

    def progress(stage, done, total):
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = Reporter(stage, total, args.progress_json)
        bars[stage].update(done)

    localiser = args.localiser
    if not localiser and model and geometry.localised:
        if "3" in bundle.localisers:  # the evaluation reads volumes
            localiser = model
        else:
            print(f"{model} has no organ localiser for volumes: the fixed crops are placed by the fixed labels (an "
                  "oracle start, noted in the report); to evaluate as a user meets it, train one with "
                  "'agentreg localiser' and give it with --localiser (or to agentreg train --localiser)",
                  file=sys.stderr)
    start = time.perf_counter()
    results, failures = evaluation.evaluate(subjects, pairs, geometry, Path(args.out), methods, settings, model, device,
                                            args.workers, progress, localiser=localiser)
    for bar in bars.values():
        bar.close()
    notes = evaluation.report_notes(pairs, names, args.split, args.data, args.dim, geometry, settings, model, device,
                                    results, failures, time.perf_counter() - start, args.workers)
    report = Path(args.report) if args.report else Path(args.out) / "evaluation.md"
    summary = evaluation.write_report(
        report, results, methods, args.dim, "agentreg " + shlex.join(args.argv), notes,
        {"failures": failures, "pairs": pairs, "methods": methods, "model": shown(model) if model else None,
         "model_hash": evaluation.file_hash(model) if model else None})
    print("\n".join(evaluation.summary_lines(summary, methods)), file=sys.stderr)
    print(f"report: {report}; per pair: {report.with_suffix('.csv')}; box plots: "
          f"{report.with_name(report.stem + '_boxplots.png')}", file=sys.stderr)
    if args.progress_json:
        print(json.dumps({"stage": "done", "report": str(report), "summary": summary}), flush=True)
    return 0


def _torch_threads(threads: int) -> None:
    if threads:
        import torch  # only once a command is past its input checks (torch takes seconds to import)

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo

    _torch_threads(args.threads)
    return run_demo(args.data, args.model, args.out, args.pairs, args.device, args.steps, args.split)


# ----------------------------------------------------------------------------------------- main
def add_agent_options(p: argparse.ArgumentParser) -> None:
    """The agent's settings, the same for ``register`` and ``register-many``."""
    p.add_argument("--steps", type=int,
                   help="agent steps (MDP steps); default and 0: the model's own, chosen on its training pairs "
                        "(66 for prostate-2d, 122 for prostate-3d; 'agentreg info MODEL' shows it); the paper used 200")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the agent's random choices (exploration and fuzzy action control); the same seed "
                        "gives the same result")
    p.add_argument("--no-fuzzy", action="store_true", help="switch fuzzy action control off (the paper's nfc)")
    p.add_argument("--fuzzy-k", type=float, help="fuzzy action control k (default: the model's, 1.5 as in the paper)")
    p.add_argument("--stop-on-convergence", action="store_true", help="stop early when the agent oscillates")
    p.add_argument("--save-steps", type=int, default=0, metavar="K",
                   help="also write the warped image every K agent steps into steps/ of the output folder (for "
                        "stepping through them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentreg", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--progress-json", action="store_true", help="one JSON progress line per step on stdout")

    def subject_options(p):  # the labelled subjects a command learns from
        p.add_argument("data", help="folder of <name>_image/<name>_label files, or a CSV with columns image,label[,name]")
        p.add_argument("--dim", type=int, choices=(2, 3), default=3)
        p.add_argument("--split", help="subject split JSON, whose --subset subjects are used (e.g. "
                                       "Resources/promise12_split.json)")
        p.add_argument("--subset", default="train", choices=("train", "validation"))
        p.add_argument("--subjects", help="comma-separated subject names (instead of --split)")

    p = sub.add_parser(
        "groundtruth", help="constrained elastix GT deformations for every ordered pair",
        description="Constrained elastix ground-truth deformations for every ordered pair of the subjects. A pair "
                    "that fails (e.g. a subject with an empty mask) is reported and skipped; at the end a summary "
                    "names the failed pairs' subjects, grouped by the reason. Exit status: 0 done (with a warning "
                    f"when a few pairs failed), 1 when more than {100 * MAX_FAILED_FRACTION:.0f} % of the pairs "
                    "failed or some subject lost all its pairs (fix or leave out the named subjects and rerun the "
                    "same command: finished pairs are kept), or for an input to correct.")
    subject_options(p)
    p.add_argument("--out", required=True, help="output folder (per-pair cache; a rerun resumes)")
    p.add_argument("--template", help="template subject (default: the first)")
    p.add_argument("--max-pairs", type=int, default=0, help="random subset of at most this many ordered pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair subset")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a Dask distributed scheduler (e.g. tcp://host:8786, of dask-jobqueue on a cluster): its "
                        "workers register the pairs instead of --workers local processes; they need this package and "
                        "OUT at the same path (a shared file system)")
    p.add_argument("--iterations", type=int, default=250, help="elastix iterations per resolution")
    p.add_argument("--resolutions", type=int, default=3, help="elastix resolutions (image pyramid levels)")
    p.add_argument("--metric", choices=protocol.GT_METRICS,
                   help="what drives the constrained registration: 'points', the paper's (mutual information of the "
                        "images, bending energy and corresponding points on the mask surfaces), or 'distance' (mean "
                        "squares of the masks' signed distance maps and bending energy: more Dice, see the README). "
                        "Default: 'distance' with --geometry auto, 'points' with the paper's geometry")
    p.add_argument("--geometry", choices=protocol.GEOMETRY_CHOICES,
                   help="model geometry: 'paper' is the paper's prostate grids (100x100 / 75x75x20, control spacing "
                        "16x16(x8) grid voxels); 'auto' derives them from the training masks (isotropic voxels on the "
                        "organ's box, about the paper's voxel and control-point budget; crops on the organ). Default "
                        f"{protocol.DEFAULT_GEOMETRY}, or 'paper' when --crop is given")
    p.add_argument("--crop", choices=protocol.CROPS,
                   help="crop boxes of the paper's geometry: 'organ' centres each subject's box on its own mask and "
                        "sizes it to it; 'paper' is the paper's centred box with the subjects translated onto a "
                        "template (elastix). Default with --geometry paper: 'paper'; --geometry auto always crops on "
                        "the organ")
    p.add_argument("--grid-size", type=_numbers(int, "--grid-size"), metavar="NX,NY[,NZ]",
                   help="model grid size in voxels (overrides the geometry's)")
    p.add_argument("--control-spacing", type=_numbers(float, "--control-spacing"), metavar="SX,SY[,SZ]",
                   help="B-spline control spacing in model grid voxels (overrides the geometry's)")
    p.add_argument("--control-spacing-mm", type=_numbers(float, "--control-spacing-mm", (1, 2, 3)),
                   metavar="S[,SY[,SZ]]",
                   help="B-spline control spacing in the images' physical units (mm), one number for every axis or "
                        "one per axis; converted to grid voxels at the training masks' median model voxel (with crops "
                        "on the organ: the median organ's); instead of --control-spacing")
    p.add_argument("--box-spreads", type=_numbers(float, "--box-spreads"), metavar="BX,BY[,BZ]",
                   help="crop box per axis in standard deviations of the organ (crops on the organ; default "
                        "10,10(,7))")
    p.add_argument("--compare-elastix", type=int, default=0, metavar="N",
                   help="also register a seeded sample of N of the pairs with plain elastix B-spline (e8 and e16 of "
                        "'agentreg evaluate') and report their Dice beside the ground truth's: the ground truth must "
                        "beat them")
    common(p)
    p.set_defaults(func=cmd_groundtruth)

    p = sub.add_parser(
        "localiser", help="train the organ localiser of a model that crops on the organ",
        description="Train the learned organ localiser (a small U-Net) on labelled images: it places the fixed crop "
                    "of a model that crops on the organ, so that users need no label or point on the fixed image. "
                    "A 2-D localiser trains on the axial slices through each volume's organ. Give the result to "
                    "'agentreg train --localiser'.")
    subject_options(p)
    p.add_argument("--out", required=True, help="localiser file to write (.pt)")
    p.add_argument("--minutes", type=float, default=8.0, help="time limit of the training (default 8)")
    p.add_argument("--iterations", type=int, default=100_000, help="batches at most (default: the time limit ends it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    common(p)
    p.set_defaults(func=cmd_localiser)

    p = sub.add_parser("sdm", help="fit the statistical deformation model (PCA) to GT deformations")
    p.add_argument("groundtruth", help="output folder of 'agentreg groundtruth'")
    p.add_argument("--modes", type=int, required=True, help="d: 15 in 2-D, 25 in 3-D in the paper")
    p.add_argument("--out", required=True, help="SDM file (.npz)")
    p.add_argument("--report-modes", default="", help="also report the reconstruction loss for these d, e.g. 5,10,15,25,40")
    p.add_argument("--report", help="write a markdown results file")
    common(p)
    p.set_defaults(func=cmd_sdm)

    p = sub.add_parser(
        "train", help="train the dual-stream Q-network on synthetic pairs (Eq. 1)",
        description="Train the dual-stream Q-network on synthetic intra- and inter-subject pairs (Eq. 1) made from "
                    "the ground truth of 'agentreg groundtruth', and save a model bundle. The model's default agent "
                    "settings: the stop rule of its configuration (on with 'converge', the default: a pair stops "
                    "once no action is predicted to help) and a cap on the number of steps chosen after training: "
                    "the step count from 1 to 200 with the best mean Dice on --step-pairs real pairs of the training "
                    "subjects (no validation subject). Its model card ('agentreg info MODEL') records both, and the "
                    "data, subjects and split it was trained on.")
    p.add_argument("--groundtruth", required=True, help="output folder of 'agentreg groundtruth' (training subjects and GT)")
    p.add_argument("--sdm", required=True, help="SDM file of 'agentreg sdm'")
    p.add_argument("--out", required=True, help="model bundle to write (.pt)")
    p.add_argument("--config", default=protocol.DEFAULT_TRAINING_CONFIGURATION,
                   help="training configuration by name: converge (the default and the shipped models'; stop rule "
                        "on), recover (converge, plus training states off the way to the answer), compact (no stop rule) or "
                        "paper (the paper's network; no stop rule)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a configuration field (repeatable)")
    p.add_argument("--checkpoint", help="checkpoint file (default: OUT with .checkpoint.pt); an existing one is resumed")
    p.add_argument("--data", help="data folder or CSV, for validation on real pairs (with --split)")
    p.add_argument("--split", help="split JSON whose 'validation' subjects are used for validation (needs --data)")
    p.add_argument("--step-pairs", type=int, default=STEP_CHOICE_PAIRS, metavar="N",
                   help="real pairs of training subjects on which the model's default number of agent steps is chosen "
                        f"(best mean Dice over 1 to 200 steps; default {STEP_CHOICE_PAIRS}; 0: no choice, the paper's "
                        "200 steps)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes (checkpointed; run again to go on)")
    p.add_argument("--init", metavar="MODEL.pt",
                   help="fine-tune: start from this model's network (same architecture, model grid and SDM) instead of "
                        "random weights; a checkpoint to resume takes precedence")
    p.add_argument("--localiser", action="append",
                   help="organ localiser file (agentreg localiser) to put in the model, one per image dimension "
                        "(repeatable); for ground truth made with --crop organ, it places the fixed crop of a new image")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "register", help="register a moving image to a fixed image with a trained agent",
        description="Register a moving image to a fixed image with a trained agent (2-D or 3-D, as the model). "
                    "Every input is checked before any work; the outputs (warped image, displacement field, "
                    "trajectory, metrics) are written to --output-dir only once all are complete, on the fixed "
                    "image's grid. Exit status: 0 done, 1 an input or setting to correct (one line says which).")
    p.add_argument("--fixed", required=True, metavar="IMAGE",
                   help="the fixed (reference) image: any file SimpleITK reads (NIfTI, NRRD, MHA, ...), 2-D or 3-D, "
                        "one grey value per voxel; the outputs are on its grid")
    p.add_argument("--moving", required=True, metavar="IMAGE", help="the moving image, warped onto the fixed image")
    p.add_argument("--model", required=True,
                   help="model bundle (.pt), e.g. Resources/Models/prostate-3d.pt; its dimension must be the images'")
    p.add_argument("--output-dir", required=True, metavar="FOLDER",
                   help="folder for warped.nii.gz, displacement.nii.gz, trajectory.csv/.png and metrics.json (made "
                        "if missing; files of an earlier run there are replaced)")
    p.add_argument("--fixed-label", metavar="LABEL",
                   help="prostate mask of the fixed image, on its grid: gives Dice and surface distances before and "
                        "after registration in metrics.json")
    p.add_argument("--moving-label", metavar="LABEL",
                   help="prostate mask of the moving image, on its grid: warped too (warped_label.nii.gz); with "
                        "--fixed-label, Dice at every agent step")
    p.add_argument("--resample-labels", action="store_true",
                   help="resample a label that is not on its image's grid onto it (nearest neighbour) instead of "
                        "refusing it")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: fastest for one pair, and it does not slow down when "
                        "other programs use the cores; 0: torch's choice)")
    add_agent_options(p)
    p.add_argument("--fixed-point", metavar="X,Y[,Z]",
                   help="the organ's centre in the fixed image (physical LPS coordinates, as ITK): places the fixed "
                        "crop of a model that crops on the organ instead of its localiser")
    p.add_argument("--progress-json", action="store_true",
                   help="one JSON progress line per stage and agent step on stdout (for the Slicer module)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "register-many", help="register many pairs (a CSV of pairs, or an atlas against a folder of patients)",
        description="Register many pairs with one model load: the pairs of a CSV (--pairs), or one atlas (--atlas, "
                    "--atlas-label) against every image of a folder of patients (--patients; each patient is the "
                    "fixed image, so the atlas label is propagated onto it). Each pair is checked and prepared as "
                    "'agentreg register' does it (in --workers processes), the agent runs on batches of pairs "
                    "(--batch-size), and each pair's results go into their own folder OUTPUT/<pair>, the files "
                    "'agentreg register' writes; OUTPUT/summary.csv has one row per pair (status registered, "
                    "skipped or failed; Dice and Hausdorff distance before and after where both labels exist; "
                    "seconds; warnings; why a pair failed). A pair that fails does not stop the others. Resumable: "
                    "rerun the same command and the pairs whose folder is complete are skipped (OUTPUT/cohort.json "
                    "records the model and settings; another model into the same folder is refused). Exit status: "
                    "0 when at least one pair was registered or skipped (failures are in the summary), 1 when every "
                    "pair failed or an input or setting is to correct (one line says which).")
    p.add_argument("--model", required=True, help="model bundle (.pt), e.g. Resources/Models/prostate-3d.pt")
    p.add_argument("--output-dir", required=True, metavar="FOLDER",
                   help="folder for one subfolder per pair (named by the CSV's 'name' column, else "
                        "<moving>_to_<fixed>; in the atlas mode by the patient) and summary.csv")
    p.add_argument("--pairs", metavar="CSV",
                   help="CSV of pairs with columns fixed,moving and optionally fixed_label,moving_label (masks on "
                        "their images' grids: Dice and distances, the warped label), fixed_point (x,y[,z], as "
                        "--fixed-point of 'agentreg register') and name; relative paths are relative to the CSV")
    p.add_argument("--atlas", metavar="IMAGE", action="append",
                   help="an atlas image (the moving image of every pair); repeat for several atlases: each patient "
                        "then gets OUTPUT/<patient>/<atlas>/ per atlas and OUTPUT/<patient>/fused_label.nii.gz, the "
                        "majority vote of the atlas labels (a tie goes to the lowest label: background)")
    p.add_argument("--atlas-label", metavar="LABEL", action="append",
                   help="the atlas's label, warped onto every patient (with several atlases: one each, in order)")
    p.add_argument("--patients", metavar="FOLDER",
                   help="folder of patient images (the fixed images: NIfTI, NRRD, MHA), <name>.<ext> or "
                        "<name>_image.<ext>; a <name>_label.<ext> beside one gives Dice and distances")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that read, check and prepare the pairs and write their results while the agent "
                        "runs (default 1: all in this process; 0: one per core)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per agent batch on the device (default 16)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a Dask distributed scheduler (e.g. tcp://host:8786, of dask-jobqueue on a cluster): its "
                        "workers read, prepare and write the pairs instead of --workers local processes; they need "
                        "this package and the files at the same paths (a shared file system); the agent runs here")
    p.add_argument("--resample-labels", action="store_true",
                   help="resample a label that is not on its image's grid onto it (nearest neighbour)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch, in this process and each worker (default 1, as 'agentreg register'; "
                        "0: torch's choice)")
    add_agent_options(p)
    p.add_argument("--progress-json", action="store_true",
                   help="one JSON progress line per pair on stdout (stage 'register', done/total pairs)")
    p.set_defaults(func=cmd_register_many)

    p = sub.add_parser("evaluate", help="the paper's Table 1 protocol on every ordered pair of the validation subjects")
    p.add_argument("--data", required=True, help="data folder or CSV (e.g. ../shared/data/promise12/grid128)")
    p.add_argument("--split", default=str(repo_file("Resources", "promise12_split.json")),
                   help="split JSON; its 'validation' subjects are evaluated (default: Resources/promise12_split.json)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3, help="2: middle slice; 3: volumes")
    p.add_argument("--model", help="model bundle for ours/nfc (default: Resources/Models/prostate-<dim>d.pt)")
    p.add_argument("--crop", choices=protocol.CROPS, help="crop boxes of the methods without a model (default: the model's; "
                                                 "without a model, the paper's)")
    p.add_argument("--localiser", help="organ localiser (a file of agentreg localiser, or a model bundle) that "
                                       "places the fixed crops with --crop organ (default: the model's; without one, "
                                       "the fixed label places them: an oracle start)")
    p.add_argument("--out", required=True, help="output folder (per pair and method cache; a rerun resumes)")
    p.add_argument("--report", help="markdown report (default OUT/evaluation.md); the CSV and box plots go beside it")
    p.add_argument("--methods", default="all",
                   help="comma-separated of none,T,localised,e8,e16,ours,nfc,gt (default: all; T for the paper's crops, "
                        "localised for crops on the organ)")
    p.add_argument("--max-pairs", type=int, default=0, help="random subset of at most this many ordered pairs")
    p.add_argument("--pairs", help="explicit pairs MOVING:FIXED,... (instead of all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair subset")
    p.add_argument("--workers", type=int, default=0, help="processes for elastix (default: all cores; itk 1 thread each)")
    p.add_argument("--device", default="auto", help="device of the agent: auto, cpu or cuda")
    p.add_argument("--steps", type=int, help="agent steps (default: the model's; the paper's were 200)")
    p.add_argument("--agent-seed", type=int, default=0, help="seed of the agent's exploration and fuzzy action control")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per agent batch")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the agent's torch (default: torch's choice)")
    p.add_argument("--iterations", type=int, default=500, help="elastix iterations per resolution for e8/e16")
    p.add_argument("--gt-iterations", type=int, default=300, help="elastix iterations per resolution for gt")
    p.add_argument("--gt-metric", choices=protocol.GT_METRICS,
                   help="metric of the gt reference (default: that of the model's ground truth; points without a model)")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="register a few real PROMISE12 validation pairs with the shipped 3-D model")
    p.add_argument("--data", default=str(repo_file("..", "shared", "data", "promise12", "grid128")),
                   help="PROMISE12 folder of caseNN_image/caseNN_label files (default: ../shared/data/promise12/grid128)")
    p.add_argument("--model", default=str(repo_file("Resources", "Models", "prostate-3d.pt")),
                   help="model bundle (default: Resources/Models/prostate-3d.pt)")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--split", default=str(repo_file("Resources", "promise12_split.json")),
                   help="split JSON whose validation subjects are paired")
    p.add_argument("--pairs", type=int, default=3, help="number of validation pairs (default 3)")
    p.add_argument("--steps", type=int, help="agent steps (default: the model's own, chosen on its training pairs)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="check a model bundle and print its model card")
    p.add_argument("model")
    p.add_argument("--name", help="model name in the card (default: the file name)")
    p.add_argument("--card", help="also write the card to this markdown file")
    p.add_argument("--evaluation", help="JSON beside an 'agentreg evaluate' report made with this model: its table "
                   "goes into the card")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "workers", None) == 0:
        args.workers = os.cpu_count() or 1
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (e.g. 'agentreg info MODEL | head'): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # the shell's status of a process ended by a broken pipe (128 + SIGPIPE)
    except (ValueError, OSError, RuntimeError) as err:
        if getattr(args, "progress_json", False):
            print(protocol.encode(protocol.error_message(str(err))), flush=True)
        print(f"agentreg: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agentreg: interrupted; cached results are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
