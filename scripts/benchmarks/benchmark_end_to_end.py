"""End-to-end speed as a user waits for it: ``agentreg register`` as a whole process against elastix.

On ordered pairs of the validation subjects of ``Resources/promise12_split.json`` in the shared PROMISE12
``native`` folder (the images as a user loads them: 15-47 slices, 128-256 pixels in-plane), each pair is
registered by two separate processes, started here and timed from process start to exit:

* **agentreg**: ``agentreg register --model M --fixed F --moving M --fixed-label --moving-label --output-dir``
  with its defaults (as a user types it; the labels give Dice and a warped label). Its ``--progress-json`` lines
  are time-stamped on arrival, which splits the wall time into stages: start-up (interpreter and imports up to
  the first message), read (images, labels and the model), localise/crop, agent, resample (warping onto the
  fixed image), write (files and metrics) and exit.
* **elastix**: a Python process (this script with ``--elastix-worker``) that imports itk-elastix, reads the same
  files, registers with elastix's default rigid + B-spline parameter maps on the full images (no crop, no mask),
  warps the moving image and its label with transformix and writes both; it reports its own stage times.

Both use their default threads (agentreg: ``--threads`` default; elastix: ITK's default, every core). The pairs
run one after the other, agentreg and elastix alternating, so both meet the same machine. Reported: seconds per
pair (median of ``--repeats``), the ratio agentreg / elastix, Dice of the warped moving label with the fixed
label (on the fixed image), and the median stage breakdown.

    python scripts/benchmarks/benchmark_end_to_end.py [--pairs 3] [--repeats 1] [--model M.pt] [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.model.devices import cpu_name

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO.parent / "shared" / "data" / "promise12" / "native"
SPLIT = REPO / "Resources" / "promise12_split.json"
MODEL = REPO / "Resources" / "Models" / "prostate-3d.pt"
AGENT_STAGES = ("start-up", "read", "localise", "agent", "resample", "write", "exit")
ELASTIX_STAGES = ("start-up", "read", "register", "resample", "write")


# ----------------------------------------------------------------------------------------- elastix process
def elastix_worker(fixed: str, moving: str, moving_label: str, out: str) -> None:
    """Register ``moving`` to ``fixed`` with elastix's default rigid + B-spline maps; print stage seconds (JSON)."""
    started = time.perf_counter()
    import itk
    from AgentRegistrationLib.elastix.wrapper import default_map, register, resample_with

    times = {"start-up": time.perf_counter() - started}
    t = time.perf_counter()
    images = [sitk.ReadImage(p, sitk.sitkFloat32) for p in (fixed, moving)]
    label = sitk.ReadImage(moving_label)
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    maps = register(images[0], images[1], [default_map("rigid"), default_map("bspline")])
    times["register"] = time.perf_counter() - t
    t = time.perf_counter()
    warped, warped_label = resample_with(maps, images[1]), resample_with(maps, label, label=True)
    times["resample"] = time.perf_counter() - t
    t = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(warped, str(Path(out) / "warped.nii.gz"))
    sitk.WriteImage(warped_label, str(Path(out) / "warped_label.nii.gz"))
    times["write"] = time.perf_counter() - t
    print(json.dumps({"seconds": times, "itk_threads": int(itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()),
                      "voxels": int(np.prod(images[0].GetSize()))}))


def run_elastix(pair: tuple[Path, ...], out: Path) -> dict:
    fixed, moving, _, moving_label = pair
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--elastix-worker", str(fixed), str(moving), str(moving_label),
                           str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:  # elastix gave up on the pair: its time is still what the user waited
        reason = re.sub(r"\(0x[0-9a-f]+\)", "", (done.stderr.strip().splitlines() or ["no message"])[-1])
        return {"wall": wall, "stages": None, "threads": None, "failed": reason[:200]}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall": wall, "stages": report["seconds"], "threads": report["itk_threads"], "failed": None}


# ----------------------------------------------------------------------------------------- agentreg process
def agentreg_command() -> list[str]:
    exe = shutil.which("agentreg", path=str(Path(sys.executable).parent)) or shutil.which("agentreg")
    return [exe] if exe else [sys.executable, "-m", "AgentRegistrationLib.cli"]


def run_agentreg(pair: tuple[Path, ...], model: Path, out: Path) -> dict:
    """One ``agentreg register`` process; stage seconds from the arrival times of its progress messages."""
    fixed, moving, fixed_label, moving_label = pair
    command = agentreg_command() + ["register", "--model", str(model), "--fixed", str(fixed), "--moving", str(moving),
                                    "--fixed-label", str(fixed_label), "--moving-label", str(moving_label),
                                    "--output-dir", str(out), "--progress-json"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: dict[str, float] = {}
    metrics = None
    for line in process.stdout:
        now = time.perf_counter() - start
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        first.setdefault(message.get("stage", "?"), now)
        if message.get("stage") == "done":
            metrics = message.get("metrics")
    error = process.stderr.read()
    if process.wait() != 0:
        raise RuntimeError(f"agentreg register failed: {error.strip().splitlines()[-1:]}")
    wall = time.perf_counter() - start
    marks = [("start-up", 0.0), ("read", first["read"]), ("localise", first.get("localise", first["register"])),
             ("agent", first["register"]), ("resample", first["resample"]), ("write", first["write"]),
             ("exit", first["done"]), ("end", wall)]
    stages = {name: marks[i + 1][1] - at for i, (name, at) in enumerate(marks[:-1])}
    return {"wall": wall, "stages": stages, "metrics": metrics}


# ----------------------------------------------------------------------------------------- measurement
def dice_on_fixed(fixed_label: Path, warped_label: Path) -> float:
    """Dice of a warped label file with the fixed label file, on the fixed image's grid."""
    return dice(*(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in (fixed_label, warped_label)))


def validation_pairs(data: Path, count: int) -> list[tuple[Path, ...]]:
    names = [n for n in json.loads(SPLIT.read_text())["validation"] if (data / f"{n}_image.nii.gz").is_file()]
    if len(names) < 2:
        sys.exit(f"benchmark: fewer than 2 validation subjects in {data}")
    ordered = list(permutations(names, 2))
    chosen = [ordered[round(i * len(ordered) / count)] for i in range(min(count, len(ordered)))]  # spread out
    return [tuple(data / f"{n}_{kind}.nii.gz" for n, kind in ((f, "image"), (m, "image"), (f, "label"), (m, "label")))
            for f, m in chosen]


def report(rows: list[dict], args: argparse.Namespace) -> str:
    med = statistics.median
    lines = [
        "# End-to-end registration time: `agentreg register` against elastix, as a user waits for it", "",
        f"Made by `python scripts/benchmarks/benchmark_end_to_end.py {' '.join(args.argv)}` on {cpu_name()} "
        f"({os.cpu_count()} cores), {len(rows)} ordered pairs of validation subjects in `../shared/data/promise12/"
        f"native` (3-D, as a user loads them), {args.repeats} repeat(s) per pair (median). Each is one process, "
        "timed from its start to its exit; agentreg with its defaults (model "
        f"`{Path(args.model).name}`, both labels given), elastix's default rigid + B-spline maps on the full images "
        "(with transformix warping the image and the label, both written).", "",
        "| fixed <- moving | voxels (fixed) | agentreg s | elastix s | ratio | Dice agentreg | Dice elastix |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        elastix_dice = "failed" if r["elastix_failed"] else f"{r['dice_elastix']:.3f}"
        lines.append(f"| {r['pair']} | {r['voxels']:,} | {r['agentreg']:.1f} | {r['elastix']:.1f} | "
                     f"{r['agentreg'] / r['elastix']:.2f} | {r['dice_agentreg']:.3f} | {elastix_dice} |")
    finished = [r for r in rows if not r["elastix_failed"]] or rows  # a failed elastix run is no time to beat
    ratio = med([r["agentreg"] / r["elastix"] for r in finished])
    lines += [f"| **median** (times and ratio: the {len(finished)} pairs elastix finished) | | "
              f"**{med([r['agentreg'] for r in finished]):.1f}** | **{med([r['elastix'] for r in finished]):.1f}** | "
              f"**{ratio:.2f}** | "
              f"{med([r['dice_agentreg'] for r in rows]):.3f} | {med([r['dice_elastix'] for r in rows]):.3f} |", "",
              "Dice medians over all pairs (a pair elastix failed on counts as 0). Where the time goes (median seconds "
              "over the pairs; elastix over the pairs it finished):", "",
              "| process | " + " | ".join(AGENT_STAGES) + " |", "|---|" + "---:|" * len(AGENT_STAGES),
              "| agentreg | " + " | ".join(f"{med([r['agent_stages'][s] for r in rows]):.2f}" for s in AGENT_STAGES)
              + " |", "",
              "| process | " + " | ".join(ELASTIX_STAGES) + " |", "|---|" + "---:|" * len(ELASTIX_STAGES),
              "| elastix | " + " | ".join(f"{med([r['elastix_stages'][s] for r in finished]):.2f}" for s in ELASTIX_STAGES)
              + " |", "",
              "- agentreg stages, from the arrival of its `--progress-json` messages: start-up = interpreter and "
              "imports up to the first message; read = images, labels and the model (torch is imported here); "
              "localise = the localiser and the crops; agent = the MDP steps; resample = the displacement onto the "
              "fixed image and the warping; write = files and metrics; exit = after the last message.",
              f"- Threads: agentreg {rows[0]['agent_threads']}, elastix {finished[0]['elastix_threads']} (ITK's "
              "default).",
              *[f"- elastix failed on {r['pair']} after {r['elastix']:.1f} s: `{r['elastix_failed']}`"
                for r in rows if r["elastix_failed"]],
              "- Dice on the fixed image's own grid (PROMISE12's spacing is unknown; nominal 1 mm).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--elastix-worker"]:
        elastix_worker(*argv[1:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(NATIVE), help="folder of caseNN_image/_label files (default: shared native)")
    p.add_argument("--model", default=str(MODEL), help="model bundle (default: the shipped 3-D model)")
    p.add_argument("--pairs", type=int, default=3, help="ordered validation pairs (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs per pair and process; the median is kept")
    p.add_argument("--markdown", help="write the report (markdown) to this file")
    p.add_argument("--json", help="write the measurements as JSON to this file")
    args = p.parse_args(argv)
    args.argv = argv
    if args.pairs < 1 or args.repeats < 1:
        p.error("--pairs and --repeats must be >= 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="agentreg-e2e-") as tmp:
        for i, pair in enumerate(validation_pairs(Path(args.data), args.pairs)):
            agent_runs, elastix_runs = [], []
            for k in range(args.repeats):
                agent_runs.append(run_agentreg(pair, Path(args.model), Path(tmp) / f"a{i}_{k}"))
                elastix_runs.append(run_elastix(pair, Path(tmp) / f"e{i}_{k}"))
            agent = sorted(agent_runs, key=lambda r: r["wall"])[len(agent_runs) // 2]
            elastix = sorted(elastix_runs, key=lambda r: r["wall"])[len(elastix_runs) // 2]
            row = {"pair": f"{pair[0].name.split('_')[0]} <- {pair[1].name.split('_')[0]}",
                   "voxels": int(np.prod(sitk.ReadImage(str(pair[0])).GetSize())),
                   "agentreg": agent["wall"], "elastix": elastix["wall"],
                   "agentreg_runs": [r["wall"] for r in agent_runs], "elastix_runs": [r["wall"] for r in elastix_runs],
                   "agent_stages": agent["stages"], "elastix_stages": elastix["stages"],
                   "agent_threads": "1 (its --threads default)",
                   "elastix_threads": elastix["threads"], "elastix_failed": elastix["failed"],
                   "dice_agentreg": dice_on_fixed(pair[2], Path(tmp) / f"a{i}_0" / "warped_label.nii.gz"),
                   "dice_elastix": 0.0 if elastix["failed"] else
                   dice_on_fixed(pair[2], Path(tmp) / f"e{i}_0" / "warped_label.nii.gz")}
            rows.append(row)
            print(f"{row['pair']}: agentreg {row['agentreg']:.1f} s, elastix {row['elastix']:.1f} s"
                  f"{' (failed)' if row['elastix_failed'] else ''}, ratio "
                  f"{row['agentreg'] / row['elastix']:.2f}; Dice {row['dice_agentreg']:.3f} / {row['dice_elastix']:.3f}",
                  flush=True)
    text = report(rows, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
