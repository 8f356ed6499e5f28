"""Throughput of a cohort: one ``agentreg register-many`` against a loop of single ``agentreg register`` processes.

On ordered pairs of the validation subjects of ``Resources/promise12_split.json`` in the shared PROMISE12 data
(``native`` by default: the images as a user loads them, which hold 7 of the 9 validation subjects, so 42 ordered
pairs; or ``grid128``, all 9: 72 pairs), with both labels given:

* **loop**: one ``agentreg register`` process per pair, one after the other, with its defaults (as a script
  of single calls runs them): each process imports torch, loads the model, prepares its pair, runs the agent and
  writes its folder;
* **batch**: one ``agentreg register-many --pairs CSV`` process for all the pairs (one model load, the agent on
  batches of ``--batch-size`` pairs, ``--workers`` processes reading, preparing and writing: by default one per
  core).

Both are timed end to end, from the first process start to the last exit, and given as pairs per minute and
their ratio (batch / loop). Then every pair's outputs are compared: warped image, warped label and displacement
field (voxel for voxel), metrics.json (all but the seconds and ``pairs_in_batch``) and trajectory.csv (every
column; the Q-values, which a batched network computes with other float32 kernels, within 2e-4 of the step's
largest |Q|: their 5 printed digits may differ in the last). The machine's
load average is reported: on a shared machine both numbers move with the other jobs.

    python scripts/benchmarks/benchmark_cohort.py [--pairs 0 (all)] [--data native|grid128|FOLDER] [--workers 0 (cores)]
        [--batch-size 16]
        [--device auto] [--model M.pt] [--markdown FILE] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "promise12"
SPLIT = REPO / "Resources" / "promise12_split.json"
MODEL = REPO / "Resources" / "Models" / "prostate-3d.pt"
TIMING = ("seconds_total", "seconds_preprocessing", "seconds_agent", "seconds_outputs", "pairs_in_batch")
IMAGES = ("warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz")
Q_TOLERANCE = 2e-4
"""Largest gap between a Q-value of the batch and of the single run, relative to the step's largest |Q|."""


def agentreg_command() -> list[str]:
    exe = shutil.which("agentreg", path=str(Path(sys.executable).parent)) or shutil.which("agentreg")
    return [exe] if exe else [sys.executable, "-m", "AgentRegistrationLib.cli"]


def validation_pairs(data: Path, count: int) -> list[dict]:
    """``count`` ordered pairs of the validation subjects, spread over all of them (fixed, moving, labels, name)."""
    names = [n for n in json.loads(SPLIT.read_text())["validation"] if (data / f"{n}_image.nii.gz").is_file()]
    if len(names) < 2:
        sys.exit(f"benchmark: fewer than 2 validation subjects in {data}")
    ordered = list(permutations(names, 2))
    count = count or len(ordered)
    chosen = [ordered[round(i * len(ordered) / count)] for i in range(min(count, len(ordered)))]
    return [{"name": f"{m}_to_{f}", "fixed": data / f"{f}_image.nii.gz", "moving": data / f"{m}_image.nii.gz",
             "fixed_label": data / f"{f}_label.nii.gz", "moving_label": data / f"{m}_label.nii.gz"}
            for f, m in chosen]


class LoadSampler:
    """The 1-minute load average every ``period`` seconds while a run goes on (``with``): its mean and maximum."""

    def __init__(self, period: float = 5.0):
        self.period, self.samples, self._stop = period, [], threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"mean": float(np.mean(self.samples)), "max": float(np.max(self.samples)), "samples": len(self.samples)}


def run(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {done.stderr.strip().splitlines()[-3:]}")
    return time.perf_counter() - start


def run_loop(pairs: list[dict], args, out: Path) -> tuple[float, list[float]]:
    seconds = []
    for pair in pairs:
        seconds.append(run(agentreg_command() + [
            "register", "--model", str(args.model), "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
            "--fixed-label", str(pair["fixed_label"]), "--moving-label", str(pair["moving_label"]),
            "--output-dir", str(out / pair["name"]), "--device", args.device]))
        print(f"loop: {pair['name']} {seconds[-1]:.1f} s", flush=True)
    return sum(seconds), seconds


def run_batch(pairs: list[dict], args, out: Path, csv_path: Path) -> float:
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["name", "fixed", "moving", "fixed_label", "moving_label"])
        writer.writeheader()
        writer.writerows(pairs)
    seconds = run(agentreg_command() + [
        "register-many", "--model", str(args.model), "--pairs", str(csv_path), "--output-dir", str(out),
        "--device", args.device, "--workers", str(args.workers), "--batch-size", str(args.batch_size)])
    print(f"batch: {len(pairs)} pairs in {seconds:.1f} s", flush=True)
    return seconds


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def compare(batch: Path, single: Path) -> dict:
    """How a pair's batch outputs differ from its single run's: the differing items, the largest Q-value gap."""
    differ = []
    for name in IMAGES:
        if (batch / name).exists() != (single / name).exists():
            differ.append(name)
        elif (single / name).exists():
            a, b = sitk.ReadImage(str(batch / name)), sitk.ReadImage(str(single / name))
            same_grid = (a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (b.GetOrigin(), b.GetSpacing(),
                                                                              b.GetDirection())
            if not same_grid or not np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)):
                differ.append(name)
    metrics = [{k: v for k, v in json.loads((f / "metrics.json").read_text()).items() if k not in TIMING}
               for f in (batch, single)]
    if metrics[0] != metrics[1]:
        differ.append("metrics.json")
    rows, other = _rows(batch / "trajectory.csv"), _rows(single / "trajectory.csv")
    q_gap = 0.0
    if len(rows) != len(other):
        differ.append("trajectory.csv (steps)")
    else:
        for r, o in zip(rows, other, strict=True):
            if {k: v for k, v in r.items() if not k.startswith("q_")} != {k: v for k, v in o.items()
                                                                          if not k.startswith("q_")}:
                differ.append("trajectory.csv (actions, parameters or Dice)")
                break
            q, q_other = (np.array([float(row[k]) for k in r if k.startswith("q_")]) for row in (r, o))
            q_gap = max(q_gap, float(np.abs(q - q_other).max() / max(np.abs(q_other).max(), 1e-12)))
        if q_gap > Q_TOLERANCE:
            differ.append(f"trajectory.csv (Q-values by {q_gap:.2g} of the step's largest)")
    timing = json.loads((batch / "metrics.json").read_text())
    return {"differ": differ, "q_gap": q_gap, "dice_after": metrics[1].get("dice_after"),
            "dice_after_batch": metrics[0].get("dice_after"),
            "batch_stages": {"preprocessing": timing["seconds_preprocessing"], "outputs": timing["seconds_outputs"],
                             "agent_share": timing["seconds_agent"] / timing["pairs_in_batch"]}}


def cpu_text() -> str:
    from AgentRegistrationLib.model.devices import cpu_name

    return f"{cpu_name()} ({os.cpu_count()} cores)"


def report(result: dict, args) -> str:
    loop, batch = result["loop_seconds"], result["batch_seconds"]
    n = len(result["pairs"])
    identical = [p for p in result["pairs"] if not p["differ"]]
    load = result["load_average"]
    # the benchmark's own load: one register process at a time during the loop; register-many and its workers
    own = {"loop": 1, "batch": result["workers"] + 1}
    contention = load["before"][0] > 1.5 or any(load[f"during_{k}"]["max"] > own[k] + 0.5 for k in own
                                                if f"during_{k}" in load)
    lines = [
        "# Cohort throughput: `agentreg register-many` against a loop of `agentreg register`", "",
        f"Made by `python scripts/benchmarks/benchmark_cohort.py {' '.join(args.argv)}` on {result['machine']}, device "
        f"{args.device}, **{n} of the {result['available']} ordered pairs** of the validation subjects of "
        f"`Resources/promise12_split.json` in `{result['data']}` ({result['subjects']} of its validation subjects "
        f"are in that folder), model `{Path(args.model).name}`, both labels given. End to end: from the first process "
        "start to the last exit.", ""] + ([args.note, ""] if args.note else []) + [
        "| | processes | seconds | pairs per minute |", "|---|---:|---:|---:|",
        f"| loop of `agentreg register` | {n} | {loop:.1f} | {60 * n / loop:.1f} |",
        f"| `agentreg register-many` (--workers {args.workers}, --batch-size {args.batch_size}) | 1 | {batch:.1f} | "
        f"{60 * n / batch:.1f} |", "",
        f"**Throughput ratio (batch / loop): {loop / batch:.2f}x.**", "",
        f"Identical results pair by pair: **{len(identical)} of {n}** (warped image and label, displacement field and "
        f"metrics voxel for voxel and number for number, the trajectory's actions, parameters and Dice). The Q-values in "
        f"trajectory.csv differ by at most {max(p['q_gap'] for p in result['pairs']):.2g} of the step's largest |Q| "
        f"(allowed: {Q_TOLERANCE:g}): the network computes a batch with other float32 kernels than one pair, and the "
        "5 printed digits of a Q-value may change in the last; no action changed.", "",
        "| pair (moving_to_fixed) | loop s | Dice after | identical |", "|---|---:|---:|---|"]
    for p in result["pairs"]:
        dice = "" if p["dice_after"] is None else f"{p['dice_after']:.3f}"
        lines.append(f"| {p['name']} | {p['loop_seconds']:.1f} | {dice} | "
                     f"{'yes' if not p['differ'] else 'no: ' + ', '.join(p['differ'])} |")
    during = "".join(f"; during the {k} mean {load[f'during_{k}']['mean']:.1f}, max {load[f'during_{k}']['max']:.1f}"
                     for k in ("loop", "batch") if f"during_{k}" in load)
    lines += ["", f"- Load average (1 min) before / after: {load['before'][0]:.1f} / {load['after'][0]:.1f}{during} on "
              f"{os.cpu_count()} cores (the benchmark's own processes: 1 during the loop, register-many and its "
              f"{result['workers']} workers during the batch)" + (
                  ": **measured under contention from other jobs; both numbers are slower than on an idle machine, "
                  "and their ratio less certain**." if contention else "; no other job ran."),
              "- Threads: 1 per process (the --threads default of both commands).",
              "- Batch, per pair (mean, the workers' seconds): reading and preparing {:.2f} s, finishing and writing "
              "{:.2f} s, the agent's share of its batch {:.2f} s.".format(
                  *(np.mean([p["batch_stages"][k] for p in result["pairs"]]) for k in ("preprocessing", "outputs",
                                                                                         "agent_share"))), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="native",
                   help="'native' or 'grid128' (the shared PROMISE12 folders) or a folder of caseNN_image/_label files")
    p.add_argument("--model", default=str(MODEL), help="model bundle (default: the shipped 3-D model)")
    p.add_argument("--pairs", type=int, default=0,
                   help="ordered validation pairs, spread over the subjects (default 0: all of them; 42 in native)")
    p.add_argument("--workers", type=int, default=0, help="--workers of register-many (default 0: one per core)")
    p.add_argument("--batch-size", type=int, default=16, help="--batch-size of register-many (default 16)")
    p.add_argument("--device", default="auto", help="--device of both commands (auto, cpu or cuda)")
    p.add_argument("--order", choices=("loop-first", "batch-first"), default="loop-first",
                   help="which runs first (default loop-first)")
    p.add_argument("--markdown", help="write the report (markdown) to this file")
    p.add_argument("--json", help="write the measurements as JSON to this file")
    p.add_argument("--keep", help="keep the outputs in this folder (default: a temporary folder, removed)")
    p.add_argument("--note", help="a paragraph for the report (e.g. what else ran on the machine)")
    p.add_argument("--from-json", help="write the report again from the measurements of an earlier run (its JSON; "
                                       "the run's own command gives the settings) to --markdown, running nothing")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        markdown = args.markdown
        args = p.parse_args(result["command"][2:])
        args.argv, args.workers = result["command"][2:], result["workers"]
        text = report(result, args)
        print(text)
        if markdown:
            Path(markdown).write_text(text)
        return 0
    args.argv = argv
    if args.pairs < 0:
        p.error("--pairs must be >= 0 (0: all)")
    args.workers = args.workers or os.cpu_count() or 1
    data = DATA / args.data if args.data in ("native", "grid128") else Path(args.data)
    pairs = validation_pairs(data, args.pairs)
    subjects = [n for n in json.loads(SPLIT.read_text())["validation"] if (data / f"{n}_image.nii.gz").is_file()]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="agentreg-cohort-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("loop", "batch"):
            shutil.rmtree(root / sub, ignore_errors=True)
        loads = {"loop": LoadSampler(), "batch": LoadSampler()}

        def sampled(what: str, job):
            with loads[what]:
                return job()

        steps = [lambda: sampled("loop", lambda: run_loop(pairs, args, root / "loop")),
                 lambda: sampled("batch", lambda: run_batch(pairs, args, root / "batch", root / "pairs.csv"))]
        first, second = (steps if args.order == "loop-first" else steps[::-1])
        measured = [first(), second()]
        (loop_seconds, per_pair), batch_seconds = measured if args.order == "loop-first" else measured[::-1]
        compared = [{"name": pair["name"], "loop_seconds": s, **compare(root / "batch" / pair["name"],
                                                                         root / "loop" / pair["name"])}
                    for pair, s in zip(pairs, per_pair, strict=True)]
    result = {"machine": cpu_text(), "data": f"../{data.relative_to(REPO.parent)}" if data.is_relative_to(REPO.parent)
              else str(data), "loop_seconds": loop_seconds, "batch_seconds": batch_seconds, "pairs": compared,
              "load_average": {"before": load_before, "after": os.getloadavg(),
                               **{f"during_{k}": v.summary() for k, v in loads.items()}},
              "device": args.device,
              "workers": args.workers, "batch_size": args.batch_size,
              "command": ["python", "scripts/benchmarks/benchmark_cohort.py", *argv],
              "available": len(subjects) * (len(subjects) - 1), "subjects": len(subjects),
              "pairs_per_minute": {"loop": 60 * len(pairs) / loop_seconds, "batch": 60 * len(pairs) / batch_seconds},
              "ratio": loop_seconds / batch_seconds}
    text = report(result, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(not p["differ"] for p in compared) else 1


if __name__ == "__main__":
    sys.exit(main())
