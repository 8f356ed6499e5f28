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
from dataclasses import replace
from pathlib import Path

import numpy as np

from AgentRegistrationLib.cli.progress import Reporter
from AgentRegistrationLib.contract import messages, points, register_folder, training_config, training_folder
from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.paths import recorded_path, shown
from AgentRegistrationLib.data.pairs import ordered_pairs

STEP_CHOICE_PAIRS = 24  # 'agentreg train': real training pairs on which a new model's default steps are chosen
MAX_FAILED_FRACTION = 0.10  # 'agentreg groundtruth' fails when more pairs fail (or a subject loses all its pairs)


def _subject_names(args) -> list[str] | None:
    from AgentRegistrationLib.data.dataset import load_split

    if args.subjects:
        return args.subjects.split(",")
    if args.split:
        return load_split(args.split)[args.subset]
    return None


def _labels_of(subjects) -> list:
    """The subjects' label maps, read once; an error naming every subject whose label is empty."""
    from AgentRegistrationLib.data.image_io import label_voxels, read_label

    labels = [read_label(s.label, f"label of {s.name}") for s in subjects]
    empty = [s.name for s, label in zip(subjects, labels, strict=True) if not label_voxels(label)]
    if empty:
        raise ValueError(f"the label of {', '.join(empty)} is empty: fix it or leave the subject out (--subjects or "
                         "another --split)")
    return labels


def _numbers(kind: type, option: str, counts: tuple[int, ...] = (2, 3)):
    """An argparse type: :func:`training_folder.parse_numbers` of ``kind``, naming ``option`` when wrong."""

    def parse(text: str) -> tuple:
        try:
            return training_folder.parse_numbers(text, kind, option, counts)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _listed(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)


# ----------------------------------------------------------------------------------------- groundtruth
def cmd_groundtruth(args) -> int:
    from AgentRegistrationLib.data.dataset import find_subjects
    from AgentRegistrationLib.data.geometry_choice import crop_padding, crop_padding_lines, model_geometry, model_voxel_size
    from AgentRegistrationLib.stages import groundtruth

    subjects = find_subjects(args.data, _subject_names(args))
    labels = _labels_of(subjects)  # read once: geometry, voxel size
    geometry = model_geometry(args.dim, args.crop, args.geometry, labels, args.grid_size, args.control_spacing,
                              args.box_spreads, args.control_spacing_mm)
    voxel = model_voxel_size(geometry, labels)
    print(f"model {geometry.description()}; a model voxel spans {_listed(voxel)} and the control spacing "
          f"{_listed(np.multiply(voxel, geometry.control_spacing))} in the images' physical units (median over the "
          f"{len(labels)} training masks)", file=sys.stderr)
    padding = crop_padding(geometry, labels, [s.name for s in subjects])  # crops off the images: said, and recorded
    for line in crop_padding_lines(geometry, padding):
        print(line, file=sys.stderr)
    template = next((s for s in subjects if s.name == args.template), subjects[0]) if args.template else subjects[0]
    pairs = ordered_pairs([s.name for s in subjects], args.max_pairs, args.seed)
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
                  "metric": args.metric or training_folder.default_gt_metric(geometry.choice)},
        max_pairs=args.max_pairs,
        seed=args.seed, source=groundtruth.data_record(args.data, args.subjects, args.split, args.subset),
        max_failed_fraction=MAX_FAILED_FRACTION, on_subject=rep.update, on_pair=pair_done, scheduler=args.scheduler,
        compare_elastix=args.compare_elastix, organ=args.organ or "", crop_padding=padding)
    rep.close()
    lines, error = groundtruth.run_report(summary, out)
    print("\n".join(lines), file=sys.stderr)
    if error:
        raise ValueError(error)
    if args.progress_json:
        print(messages.encode(messages.done_message(summary=summary.to_dict())), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- sdm
def cmd_sdm(args) -> int:
    from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary
    from AgentRegistrationLib.stages.sdm_fit import fit_from_groundtruth, reconstruction_report, write_report

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
        print(messages.encode(messages.done_message(reconstruction=table)), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- localiser
def cmd_localiser(args) -> int:
    """Train the organ localiser that places the fixed crop of a model that crops on the organ."""
    from AgentRegistrationLib.data.dataset import find_subjects
    from AgentRegistrationLib.data.image_io import read_image
    from AgentRegistrationLib.data.localiser import (
        LocaliserConfig,
        OrganLocaliser,
        load_localiser,
        localiser_record,
        save_localiser,
    )
    from AgentRegistrationLib.data.localiser_training import TrainingLog, organ_slices, train_localiser
    from AgentRegistrationLib.data.orientation import canonical

    if args.minutes <= 0 or args.iterations < 0 or (args.iterations == 0 and not args.init):
        raise ValueError(f"--minutes and --iterations must be positive (--iterations 0 only with --init), not "
                         f"{args.minutes:g} and {args.iterations}")
    settings = {key: value for key, value in (("weighting", args.weighting),
                                              ("refine", None if args.refine is None else args.refine == "yes"))
                if value is not None}
    config, initial, before = replace(LocaliserConfig.default(args.dim), **settings), None, {}
    if args.init:  # its network and settings (those given here replace them), and its training record
        if not Path(args.init).is_file():
            raise ValueError(f"--init {args.init}: no such localiser file")
        loaded = load_localiser(args.init)
        if loaded.config.dim != args.dim:
            raise ValueError(f"--init {args.init} is a {loaded.config.dim}-D localiser: give --dim {loaded.config.dim}")
        config = replace(loaded.config, **settings)
        initial = OrganLocaliser(config)
        initial.load_state_dict(loaded.state_dict())
        before = localiser_record(args.init)
    subjects = find_subjects(args.data, _subject_names(args))
    images, labels = [], []
    for s, label in zip(subjects, _labels_of(subjects), strict=True):
        image, label = canonical(read_image(s.image, f"image of {s.name}")), canonical(label)  # as registration sees it
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

    localiser = train_localiser(images, labels, config, iterations=args.iterations, time_limit=60.0 * args.minutes,
                                seed=args.seed, log=log, progress=progress, initial=initial)
    rep.close()
    record = {"subjects": [s.name for s in subjects], "data": recorded_path(args.data),
              "iterations": int(before.get("iterations", 0)) + log.iterations,
              "seconds": round(float(before.get("seconds", 0.0)) + log.seconds, 1), "seed": args.seed}
    save_localiser(localiser, args.out, {"training": record})
    print(f"organ localiser ({args.dim}-D) trained on {len(images)} {'slices' if args.dim == 2 else 'volumes'} of "
          f"{len(subjects)} subjects: {log.iterations} batches in {log.seconds / 60:.1f} min; saved to {args.out}. "
          f"Give it to 'agentreg train --localiser {args.out}'.", file=sys.stderr)
    if args.progress_json:
        print(messages.encode(messages.done_message(localiser=str(args.out))), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
    from AgentRegistrationLib.model.devices import resolve_device
    from AgentRegistrationLib.stages import training
    from AgentRegistrationLib.stages.training_finish import finish_bundle, training_text
    from AgentRegistrationLib.stages.training_set import TrainingSet, validation_pairs_from_split

    if args.split and not args.data:
        raise ValueError("--split needs --data: the data folder or CSV that holds the split's validation subjects")
    if args.step_pairs < 0:
        raise ValueError(f"--step-pairs must be 0 or more, not {args.step_pairs}")
    if args.init and not Path(args.init).is_file():
        raise ValueError(f"--init {args.init}: no such model file (give a model bundle made by agentreg train)")
    device = resolve_device(args.device)
    config = training_config.config_by_name(args.config).with_overrides(args.set or [])
    training_set = TrainingSet.from_groundtruth(Path(args.groundtruth))  # the ground-truth folder, read once
    sdm = StatisticalDeformationModel.load(args.sdm)
    validation = None
    if args.data and args.split:
        validation = validation_pairs_from_split(training_set, args.data, args.split, config.validation_pairs,
                                                 config.seed)
    if device.type == "cpu":
        _torch_threads(args.threads)
    rep = Reporter("train", config.iterations, args.progress_json)
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(args.out).with_suffix(".checkpoint.pt")
    bundle = training.train(config, training_set, sdm, training_set.geometry, device, checkpoint, validation,
                            lambda i, n, info: rep.update(i, **info),
                            time_limit=None if args.max_minutes is None else 60.0 * args.max_minutes,
                            init=Path(args.init) if args.init else None)
    rep.close()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and writes)
        return 0

    def step_choice(pairs: int) -> None:
        Reporter("agent", 0, args.progress_json).message(
            f"choosing the model's default number of steps on {pairs} real pairs of training subjects (up to 200 steps "
            "each)")

    note = finish_bundle(bundle, training_set, step_pairs=args.step_pairs, device=device, localisers=args.localiser,
                         data=args.data, split=args.split, on_step_choice=step_choice, organ=args.organ)
    bundle.save(args.out)  # once, finished
    if note:
        print(note, file=sys.stderr)
    print(training_text(config, bundle, args.out), file=sys.stderr)
    if args.progress_json:
        print(messages.encode(messages.done_message(bundle=str(args.out))), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- register
def _point(text: str | None) -> np.ndarray | None:
    """``--fixed-point`` (:func:`points.parse_point`) as an array."""
    point = points.parse_point(text, "--fixed-point")
    return None if point is None else np.array(point)


def cmd_register(args) -> int:
    """Check every input first (nothing is loaded or written before), then read, localise or pre-align, crop,
    run the agent and write; each stage reports progress from its start."""
    from AgentRegistrationLib.data import inputs

    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads {args.threads}: give a positive number of CPU threads, or 0 for torch's choice")
    if args.save_steps < 0:
        raise ValueError(f"--save-steps {args.save_steps}: give K > 0 to write the warped image every K steps, or 0")
    if args.steps is not None and args.steps < 0:
        inputs.agent_steps(args.steps, 0)  # the message; the model's default is added once it is loaded
    output_dir = inputs.check_output_dir(args.output_dir)
    fixed_point = _point(args.fixed_point)
    from AgentRegistrationLib.stages.figures import FigureProcess

    with FigureProcess() as figures:  # first: matplotlib's import runs on another core while torch's runs here
        return _register(args, output_dir, fixed_point, figures)


def _register(args, output_dir: Path, fixed_point: np.ndarray | None, figures) -> int:
    """:func:`cmd_register` once its arguments are checked; ``figures``: the :class:`.FigureProcess` that draws."""
    from AgentRegistrationLib.data import inputs

    rep = Reporter("read", 3 + bool(args.fixed_label) + bool(args.moving_label), args.progress_json, delay=1.0)
    rep.update(0)
    given = inputs.read_register_inputs(args.fixed, args.moving, args.fixed_label, args.moving_label,
                                        args.resample_labels, on_read=lambda done, total: rep.update(done))
    from AgentRegistrationLib.model.bundle import load_bundle
    from AgentRegistrationLib.model.devices import resolve_device
    from AgentRegistrationLib.stages.outputs import write_registration_outputs
    from AgentRegistrationLib.stages.registration import Registrar

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
                                     similarity_guard=not args.no_similarity_guard,
                                     fuzzy_action_control=not args.no_fuzzy)
    registrar = Registrar(bundle, device)
    rep.begin("localise" if bundle.geometry.localised else "prealign", 0, organ=bundle.organ)

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
                               step_limit=settings.steps, fixed_label=given.fixed_label, figures=figures)
    rep.close()
    m = result.metrics
    summary = f"registered in {m['seconds_total']:.2f} s (agent {m['seconds_agent']:.2f} s, {m['steps']} steps on {device})"
    if "dice_after" in m:
        summary += f"; {register_folder.dice_text(m)}"
    print(summary + f"; outputs in {args.output_dir}", file=sys.stderr)
    for note in register_folder.metrics_notes(m):
        print(f"agentreg: {note}", file=sys.stderr)
    if args.progress_json:
        print(messages.encode(messages.done_message(output_dir=str(args.output_dir), metrics=m)), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- register-many
def cmd_register_many(args) -> int:
    """Many pairs with one model load (the engine is :mod:`.cohort`); exit 1 only when every pair failed."""
    from AgentRegistrationLib.data import inputs
    from AgentRegistrationLib.stages.cohort import register_cohort
    from AgentRegistrationLib.stages.cohort_pairs import multi_atlas_pairs, pairs_from_csv
    from AgentRegistrationLib.stages.cohort_results import FAILED, is_fusion, summary_text
    from AgentRegistrationLib.stages.cohort_worker import CohortOptions

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
    from AgentRegistrationLib.model.bundle import load_bundle
    from AgentRegistrationLib.model.devices import resolve_device

    _torch_threads(args.threads)
    device = resolve_device(args.device)
    bundle = load_bundle(args.model)
    steps, warning = inputs.agent_steps(args.steps, bundle.agent_settings().steps)
    settings = bundle.agent_settings(steps=steps, seed=args.seed, fuzzy_k=args.fuzzy_k,
                                     stop_on_convergence=args.stop_on_convergence,
                                     similarity_guard=not args.no_similarity_guard,
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
    summary = output_dir / register_folder.COHORT_SUMMARY_CSV
    print(f"register-many: {summary_text(reports)} ({steps} steps on {device}); summary in {summary}",
          file=sys.stderr)
    failed = [r for r in reports if r.status == FAILED and not is_fusion(r)]
    if len(failed) == len(pairs):
        raise ValueError(f"every pair failed (the first: {failed[0].pair.name}: {failed[0].message}); see {summary}")
    if args.progress_json:
        print(messages.encode(messages.done_message(output_dir=str(output_dir), summary=str(summary),
                                                    pairs=len(reports), failed=len(failed))), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from AgentRegistrationLib.model.bundle import load_bundle
    from AgentRegistrationLib.model.card import model_card
    from AgentRegistrationLib.stages.evaluation import file_hash

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
    from AgentRegistrationLib.data.dataset import find_subjects, load_split
    from AgentRegistrationLib.data.geometry_choice import model_geometry
    from AgentRegistrationLib.model.devices import resolve_device
    from AgentRegistrationLib.stages import evaluation, evaluation_report

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
                                             **evaluation.gt_settings(args.gt_iterations, bundle), gt_metric=gt_metric,
                                             batch_size=args.batch_size,
                                             similarity_guard=not args.no_similarity_guard)
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
    seconds = time.perf_counter() - start
    itself = {}
    # registering a subject to itself needs what a user's registration needs: a localiser for the model's images
    if (model and "ours" in methods and not args.no_self_registration
            and (not geometry.localised or str(args.dim) in bundle.localisers)):
        from AgentRegistrationLib.stages.registration import Registrar
        from AgentRegistrationLib.stages.self_registration import (
            self_registration,
            self_registration_lines,
            self_registration_summary,
        )

        evaluated = {name for pair in pairs for name in pair}
        itself = self_registration({n: s for n, s in subjects.items() if n in evaluated}, Registrar(bundle, device),
                                   bundle.agent_settings(steps=settings.steps, seed=settings.seed,
                                                         similarity_guard=settings.similarity_guard),
                                   args.dim, progress)
    for bar in bars.values():
        bar.close()
    notes = evaluation_report.report_notes(pairs, names, args.split, args.data, args.dim, geometry, settings, model,
                                           device, results, failures, seconds, args.workers)
    if itself:
        notes += ["", *self_registration_lines(itself)]
    report = Path(args.report) if args.report else Path(args.out) / "evaluation.md"
    summary = evaluation_report.write_report(
        report, results, methods, args.dim, "agentreg " + shlex.join(args.argv), notes,
        {"failures": failures, "pairs": pairs, "methods": methods, "model": shown(model) if model else None,
         "model_hash": evaluation.file_hash(model) if model else None, "self_registration": itself})
    print("\n".join(evaluation_report.summary_lines(summary, methods)), file=sys.stderr)
    for method, g in evaluation_report.gains_over_start(results, methods).items():
        print(f"{method:>4}: gain over its start per pair: median {g['median']:+.3f}, mean {g['mean']:+.3f}; "
              f"{100 * g['improved']:.0f} % of the pairs improved, {100 * g['worse']:.0f} % worse by more than "
              f"{evaluation_report.WORSE}", file=sys.stderr)
    if itself:
        print(self_registration_summary(itself), file=sys.stderr)
    print(f"report: {report}; per pair: {report.with_suffix('.csv')}; box plots: "
          f"{report.with_name(report.stem + '_boxplots.png')}", file=sys.stderr)
    if args.progress_json:
        print(messages.encode(messages.done_message(report=str(report), summary=summary)), flush=True)
    return 0


def _torch_threads(threads: int) -> None:
    if threads:
        import torch  # only once a command is past its input checks (torch takes seconds to import)

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from AgentRegistrationLib.stages.demo import run_demo

    _torch_threads(args.threads)
    return run_demo(args.data, args.model, args.out, args.pairs, args.device, args.steps, args.split)
