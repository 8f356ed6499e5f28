"""``agentreg``: the engine's command line (ground truth, SDM, training, registration, ...).

Every command prints a progress bar (tqdm, on stderr); with ``--progress-json`` it prints one
JSON line per step on stdout instead, which the Slicer modules read. User errors end with one
line ``agentreg: error: ...`` (or ``{"stage": "error", ...}``) and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from .image_io import atomic_write


class Reporter:
    """Progress on stderr (tqdm) or as JSON lines on stdout."""

    def __init__(self, stage: str, total: int, json_lines: bool):
        self.stage, self.total, self.json_lines = stage, total, json_lines
        self.bar = None
        if not json_lines:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int, **info) -> None:
        if self.json_lines:
            print(json.dumps({"stage": self.stage, "done": done, "total": self.total, **info}), flush=True)
        else:
            self.bar.n = done
            if info:
                self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in info.items()})
            self.bar.refresh()

    def message(self, text: str) -> None:
        if self.json_lines:
            print(json.dumps({"stage": self.stage, "message": text}), flush=True)
        else:
            (self.bar.write if self.bar else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _subject_names(args) -> list[str] | None:
    if args.subjects:
        return args.subjects.split(",")
    if args.split:
        from .dataset import load_split
        return load_split(args.split)[args.subset]
    return None


# ----------------------------------------------------------------------------------------- groundtruth
def cmd_groundtruth(args) -> int:
    from .dataset import find_subjects, prepare_subject
    from .groundtruth import dice_summary, run_groundtruth
    from .image_io import read_image
    from .preprocessing import ModelGeometry

    geometry = ModelGeometry.paper(args.dim)
    subjects = find_subjects(args.data, _subject_names(args))
    template = next((s for s in subjects if s.name == args.template), subjects[0]) if args.template else subjects[0]
    out = Path(args.out)
    subject_dir = out / "subjects"
    start = time.perf_counter()
    template_image = read_image(template.image, "template image")
    rep = Reporter("preprocess", len(subjects), args.progress_json)
    for i, s in enumerate(subjects):
        prepare_subject(s, template_image, geometry, subject_dir)
        rep.update(i + 1)
    rep.close()
    names = [s.name for s in subjects]
    pairs = [(m, f) for m in names for f in names if m != f]
    if args.max_pairs and len(pairs) > args.max_pairs:
        pairs = sorted(random.Random(args.seed).sample(pairs, args.max_pairs))
    rep = Reporter("groundtruth", len(pairs), args.progress_json)

    def progress(done, total, result, error):
        if error:
            rep.message(error)
        rep.update(done, **({"dice": result.dice_after} if result else {}))

    results, failures = run_groundtruth(subject_dir, names, geometry, out, pairs, args.workers,
                                        {"iterations": args.iterations}, progress)
    rep.close()
    results.sort(key=lambda r: (r.moving, r.fixed))
    lines = ["moving,fixed,dice_before,dice_after,seconds"] + [
        f"{r.moving},{r.fixed},{r.dice_before:.4f},{r.dice_after:.4f},{r.seconds:.2f}" for r in results]
    atomic_write(out / "gt_dice.csv", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    summary = {
        "dim": args.dim, "geometry": geometry.to_dict(), "template": template.name, "subjects": names,
        "pairs_requested": len(pairs), "pairs_done": len(results), "failures": len(failures),
        "dice_before": dice_summary([r.dice_before for r in results]),
        "dice_after": dice_summary([r.dice_after for r in results]),
        "pair_seconds_sum": float(sum(r.seconds for r in results)),
        "wall_seconds_this_run": time.perf_counter() - start,
        "workers": args.workers, "iterations": args.iterations, "max_pairs": args.max_pairs, "seed": args.seed,
    }
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    d = summary["dice_after"]
    print(f"ground truth: {len(results)} pairs ({len(failures)} failed); Dice after GT registration "
          f"median {d['median']:.3f}, mean {d['mean']:.3f}, std {d['std']:.3f} "
          f"(before: median {summary['dice_before']['median']:.3f}); written to {out}", file=sys.stderr)
    if args.progress_json:
        print(json.dumps({"stage": "done", "summary": summary}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- sdm
def cmd_sdm(args) -> int:
    from .sdm_fitting import fit_from_groundtruth, reconstruction_report

    gt = Path(args.groundtruth)
    sdm, coefficients, results = fit_from_groundtruth(gt, args.modes)
    sdm.save(args.out)
    print(f"SDM with {args.modes} modes ({100 * sdm.explained_variance_ratio.sum():.1f} % of the variance) "
          f"from {len(results)} GT deformations saved to {args.out}", file=sys.stderr)
    modes = sorted({int(m) for m in args.report_modes.split(",")} | {args.modes}) if args.report_modes else [args.modes]
    table = reconstruction_report(gt, coefficients, results, modes)
    for row in table:
        print(f"d = {row['modes']:3d}: Dice loss of reconstruction mean {100 * row['loss_mean']:.2f} %, "
              f"median {100 * row['loss_median']:.2f} %, max {100 * row['loss_max']:.2f} %", file=sys.stderr)
    if args.report:
        from .sdm_fitting import write_report
        write_report(Path(args.report), gt, table, "agentreg " + " ".join(sys.argv[1:]))
    if args.progress_json:
        print(json.dumps({"stage": "done", "reconstruction": table}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentreg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--progress-json", action="store_true", help="one JSON progress line per step on stdout")

    p = sub.add_parser("groundtruth", help="constrained elastix GT deformations for every ordered pair")
    p.add_argument("data", help="folder of <name>_image/<name>_label files, or a CSV with columns image,label[,name]")
    p.add_argument("--out", required=True, help="output folder (per-pair cache; a rerun resumes)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3)
    p.add_argument("--split", help="subject split JSON (e.g. Resources/promise12_split.json)")
    p.add_argument("--subset", default="train", choices=("train", "validation"))
    p.add_argument("--subjects", help="comma-separated subject names (instead of --split)")
    p.add_argument("--template", help="template subject (default: the first)")
    p.add_argument("--max-pairs", type=int, default=0, help="random subset of at most this many ordered pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair subset")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")
    p.add_argument("--iterations", type=int, default=250, help="elastix iterations per resolution")
    common(p)
    p.set_defaults(func=cmd_groundtruth)

    p = sub.add_parser("sdm", help="fit the statistical deformation model (PCA) to GT deformations")
    p.add_argument("groundtruth", help="output folder of 'agentreg groundtruth'")
    p.add_argument("--modes", type=int, required=True, help="d: 15 in 2-D, 25 in 3-D in the paper")
    p.add_argument("--out", required=True, help="SDM file (.npz)")
    p.add_argument("--report-modes", default="", help="also report the reconstruction loss for these d, e.g. 5,10,15,25,40")
    p.add_argument("--report", help="write a markdown results file")
    common(p)
    p.set_defaults(func=cmd_sdm)

    for register in _extra_commands:
        register(sub, common)
    return parser


_extra_commands: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "workers", None) == 0:
        import os
        args.workers = os.cpu_count() or 1
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if getattr(args, "progress_json", False):
            print(json.dumps({"stage": "error", "message": str(err)}), flush=True)
        print(f"agentreg: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agentreg: interrupted; cached results are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
