"""One prepared, time-boxed session on a lent GPU machine (torch and numpy there; no SimpleITK, no elastix).

Here, first pack what it needs (the ground truth, the SDMs and prepared validation pairs of ``agentreg evaluate``:
all 72 in 2-D; in 3-D the seeded 24-pair subset plus the benchmark's 8 pairs, to fit the 64 MB that travel)::

    python scripts/recipes/gpu_session.py pack --into work/gpu_in

Then, on the GPU machine, with ``work/gpu_in`` carried::

    python scripts/recipes/gpu_session.py run --inputs work/gpu_in --out "$OUT" --budget 540

Stages, each logged; a failing stage is logged and the next one runs:

1. the CUDA path: the shipped models on CUDA and on the CPU, same pairs and seed: actions, parameters, Dice;
2. the benchmark (``scripts/benchmarks/benchmark_register.py --device cuda`` on the prepared pairs, elastix seconds from
   ``results/benchmark_cpu.json`` measured on the CPU machine on the same pairs);
3. training from scratch, each run given a share of the remaining budget (``training.train(time_limit=...)``):
   the paper's configuration and the compact (shipped) one, in 2-D and 3-D;
4. each trained model evaluated with ``ours`` and ``nfc`` on all the packed validation pairs
   (``evaluation.evaluate``), in a background process while the next model trains: paper and compact on the
   same pairs in the same run.

Or, to train the shipped model's candidate configurations side by side on one ground truth (copied into an ignored
folder of the repository, e.g. ``work/gpu_train``: its ``pairs``, ``subjects`` and ``summary.json``, and the SDM)::

    python scripts/recipes/gpu_session.py configs --groundtruth work/gpu_train/gt --sdm work/gpu_train/sdm.npz \
        --configs converge,recover --out "$OUT" --budget 520

Each configuration trains from scratch in its own process to its planned number of batches (``--iterations``;
``OUT/<config>-<batches>.pt``, its checkpoint), then on until the budget (a second checkpoint). Back here, ``agentreg
train`` with the same ground truth, SDM and configuration, ``--checkpoint`` that file and ``--set iterations=<batches>``
makes the model bundle without training further (its validation, steps and localiser as for any model).
``--resume-from FOLDER`` goes on from ``FOLDER/<config>.pt`` (a checkpoint brought back from an earlier session);
``--set key=value`` changes a field of every configuration (e.g. ``augment=0.5``; give ``agentreg train`` the same).

``OUT`` of ``run`` receives ``log.txt``, ``session.json`` and one ``<run>.tar`` per training run (loss.csv, the model bundle
and checkpoint where they fit the 16 MB a file the machine gives back, the evaluation report, CSV and box plots).

Back here, with the returned files unpacked into a folder (``results/gpu_session``: ``session.json`` and
``<run>/summary.json``), the paper-vs-compact table::

    python scripts/recipes/gpu_session.py report --returned results/gpu_session --out results/paper_vs_compact.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
ENGINE = str(REPO / "AgentRegistration")  # the engine, not installed on the GPU machine
sys.path.insert(0, ENGINE)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ENGINE, os.environ.get("PYTHONPATH")]))  # subprocesses

from AgentRegistrationLib.contract.paths import shipped_model  # noqa: E402
from AgentRegistrationLib.contract.training_config import config_by_name  # noqa: E402
from AgentRegistrationLib.core.metrics import dice_batch  # noqa: E402
from AgentRegistrationLib.core.network import DualStreamQNetwork, NetworkConfig, count_parameters  # noqa: E402
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel  # noqa: E402
from AgentRegistrationLib.core.warp import warp  # noqa: E402
from AgentRegistrationLib.model.bundle import load_bundle  # noqa: E402
from AgentRegistrationLib.model.devices import device_name  # noqa: E402
from AgentRegistrationLib.stages.evaluation import EvaluationSettings, evaluate, select_pairs  # noqa: E402
from AgentRegistrationLib.stages.evaluation_pairs import pair_dir, prepared_pairs  # noqa: E402
from AgentRegistrationLib.stages.evaluation_report import write_report  # noqa: E402
from AgentRegistrationLib.stages.groundtruth import GroundTruthSummary  # noqa: E402
from AgentRegistrationLib.stages.training import train  # noqa: E402
from AgentRegistrationLib.stages.training_set import TrainingSet  # noqa: E402

MAX_RETURNED_FILE = 15 * 2**20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a rehearsal (run --allow-cpu)
SHIPPED = {dim: shipped_model(dim) for dim in (2, 3)}
# (name, dimension, configuration, share of the training time)
RUNS = [("paper-2d", 2, "paper", 0.20), ("compact-2d", 2, "compact", 0.18),
        ("paper-3d", 3, "paper", 0.34), ("compact-3d", 3, "compact", 0.28)]


# ----------------------------------------------------------------------------------------- pack (here)
def pack(into: Path, work: Path) -> None:
    """Copy what the session reads into ``into`` (an ignored folder the device tool carries)."""
    if into.exists():
        shutil.rmtree(into)
    names = json.loads((REPO / "Resources" / "promise12_split.json").read_text())["validation"]
    subset = {pair_dir(Path(), m, f).name for m, f in select_pairs(names, 24, None, 0)}
    for dim in (2, 3):
        gt = work / f"gt{dim}d"
        for sub in ("pairs", "subjects"):
            shutil.copytree(gt / sub, into / f"gt{dim}d" / sub)
        shutil.copy(GroundTruthSummary.path(gt), GroundTruthSummary.path(into / f"gt{dim}d"))
        shutil.copy(work / f"sdm{dim}d.npz", into / f"sdm{dim}d.npz")
        prepared = sorted((work / f"eval{dim}d" / "pairs").glob("*/prepared.npz"))
        for i, f in enumerate(prepared):
            if dim == 3 and i >= 8 and f.parent.name not in subset:  # the benchmark's first 8 and the subset
                continue
            (into / f"eval{dim}d" / "pairs" / f.parent.name).mkdir(parents=True)
            shutil.copy(f, into / f"eval{dim}d" / "pairs" / f.parent.name / "prepared.npz")
    size = sum(f.stat().st_size for f in into.rglob("*") if f.is_file())
    counts = {d: len(list((into / f"eval{d}d" / "pairs").iterdir())) for d in (2, 3)}
    print(f"packed {size / 2**20:.1f} MiB into {into}; prepared validation pairs: 2-D {counts[2]}, 3-D {counts[3]}")


# ----------------------------------------------------------------------------------------- run (GPU machine)
class Session:
    def __init__(self, out: Path, budget: float):
        self.out = out
        self.start = time.perf_counter()
        self.deadline = self.start + budget
        self.doc: dict = {"stages": {}}
        self.log_file = (out / "log.txt").open("a")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def stage(self, name: str, function, *args) -> None:
        self.log(f"stage {name}: start ({self.left():.0f} s left)")
        t0 = time.perf_counter()
        try:
            result = function(*args)
            self.doc["stages"][name] = {"ok": True, "seconds": time.perf_counter() - t0, "result": result}
            self.log(f"stage {name}: done in {time.perf_counter() - t0:.1f} s")
        except Exception:
            self.doc["stages"][name] = {"ok": False, "seconds": time.perf_counter() - t0, "error": traceback.format_exc()}
            self.log(f"stage {name}: FAILED\n{traceback.format_exc()}")
        self.save()

    def save(self) -> None:
        (self.out / "session.json").write_text(json.dumps(self.doc, indent=2, default=str) + "\n")


def device_text() -> str:
    """The session's device: the GPU's name (on the CPU: a rehearsal)."""
    return device_name(torch.device(DEVICE)) if DEVICE == "cuda" else "CPU (rehearsal)"


def environment() -> dict:
    smi = shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True).stdout.strip()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": device_text(), "nvidia_smi": smi,
            "python": sys.version.split()[0]}


def cuda_path(inputs: Path) -> dict:
    """The shipped models on CUDA against the CPU on 8 prepared validation pairs, same seed."""
    out = {}
    for dim, model in SHIPPED.items():
        bundle = load_bundle(model)
        pairs = [pair for _, pair in prepared_pairs(inputs / f"eval{dim}d", bundle.geometry, 8)]
        arrays = {key: torch.as_tensor(np.stack([p[key] for p in pairs]))[:, None]
                  for key in ("fixed", "moving", "fixed_label", "moving_label")}
        runs = {}
        for device in ("cpu", DEVICE):
            agent = bundle.agent(device)
            result = agent.run(arrays["fixed"], arrays["moving"], bundle.agent_settings(seed=0))
            after = dice_batch(warp(arrays["moving_label"].to(device), result.displacement, mode="nearest"),
                               arrays["fixed_label"].to(device))
            runs[device] = {"actions": torch.stack(result.trajectory.actions).cpu().numpy(), "theta": result.theta,
                            "dice": after.cpu().numpy(), "u": result.displacement.cpu()}
        same = runs["cpu"]["actions"] == runs[DEVICE]["actions"]
        first_differ = [int(np.argmin(same[:, i])) if not same[:, i].all() else None for i in range(same.shape[1])]
        out[f"{dim}d"] = {
            "pairs": len(pairs), "steps": int(same.shape[0]), "identical_actions_fraction": float(same.mean()),
            "pairs_with_identical_trajectories": int(same.all(axis=0).sum()), "first_differing_step": first_differ,
            "max_theta_difference": float(np.abs(runs["cpu"]["theta"] - runs[DEVICE]["theta"]).max()),
            "max_displacement_difference_voxels": float((runs["cpu"]["u"] - runs[DEVICE]["u"]).abs().max()),
            "dice_cpu": runs["cpu"]["dice"].tolist(), f"dice_{DEVICE}": runs[DEVICE]["dice"].tolist(),
        }
    return out


def benchmark(inputs: Path, out: Path, args) -> dict:
    command = [sys.executable, str(REPO / "scripts" / "benchmarks" / "benchmark_register.py"), "--device", DEVICE,
               "--prepared", str(inputs / "eval2d"), "--prepared", str(inputs / "eval3d"), "--pairs", "8", "--batch",
               str(args.bench_batch), "--steps", str(args.bench_steps), "--repeats", str(args.repeats),
               "--elastix-reference", args.elastix_reference, "--markdown",
               "--json", str(out / "benchmark_gpu.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    (out / "benchmark_gpu.txt").write_text(" ".join(command) + "\n\n" + done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"benchmark exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads((out / "benchmark_gpu.json").read_text())


def training_inputs(gt: Path, sdm_file: Path) -> tuple:
    """``(geometry, sdm, training_set)`` of a ground-truth folder and its SDM, as ``agentreg train`` reads them."""
    training_set = TrainingSet.from_groundtruth(gt)
    return training_set.geometry, StatisticalDeformationModel.load(sdm_file), training_set


def train_run(inputs: Path, work: Path, name: str, dim: int, config_name: str, seconds: float,
              resume_from: Path | None = None) -> dict:
    """Train one model for ``seconds`` on the GPU (going on from ``resume_from/<name>/checkpoint.pt`` when
    given); returns the bundle's training record."""
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        shutil.copy(resume_from / name / "checkpoint.pt", run_dir / "checkpoint.pt")
    geometry, sdm, training_set = training_inputs(inputs / f"gt{dim}d", inputs / f"sdm{dim}d.npz")
    checkpoint = run_dir / "checkpoint.pt"
    # the time limit ends the run; one checkpoint, at the end (the 3-D paper network's is ~300 MB)
    config = config_by_name(config_name).with_overrides(["iterations=1000000", "checkpoint_every=1000000"])
    torch.backends.cudnn.benchmark = True
    bundle = train(config, training_set, sdm, geometry, torch.device(DEVICE), checkpoint, validation=None,
                   time_limit=seconds)
    bundle.save(run_dir / "model.pt")
    return {k: v for k, v in bundle.training.items() if k != "subjects"}


def evaluate_model(model: Path, prepared: Path, out: Path, title: str, max_pairs: int | None = None) -> None:
    """``ours`` and ``nfc`` on every prepared pair of ``prepared``; report, CSV and box plots in ``out``."""
    bundle = load_bundle(model)
    # a copy per model: evaluate() caches each method's result beside the pair, and models run in parallel
    pairs = [names for names, _ in prepared_pairs(prepared, bundle.geometry, max_pairs)]
    for names in pairs:
        pair_dir(out, *names).mkdir(parents=True, exist_ok=True)
        shutil.copy(pair_dir(prepared, *names) / "prepared.npz", pair_dir(out, *names) / "prepared.npz")
    methods = ["ours", "nfc"]
    settings = EvaluationSettings(steps=200, seed=0, iterations=0, gt_iterations=0, batch_size=16)
    results, failures = evaluate({}, pairs, bundle.geometry, out, methods, settings, model, torch.device(DEVICE))
    t = bundle.training
    notes = [f"Model: {title} ({bundle.network.config.architecture} network), trained {t.get('iterations')} batches in "
             f"{t.get('seconds', 0) / 60:.1f} min on {t.get('device')}; agent on {device_text()}, batches of "
             f"{settings.batch_size} pairs, {settings.steps} steps, seed {settings.seed}; {len(pairs)} prepared validation "
             f"pairs (the cache of agentreg evaluate); failures: {len(failures)}."]
    command = f"python scripts/recipes/gpu_session.py run --inputs work/gpu_in --out OUT  # run {title}"
    summary = write_report(out / "evaluation.md", results, methods, bundle.dim, command, notes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def bundle_up(session: Session, work: Path, name: str) -> None:
    """``OUT/<name>.tar``: loss.csv, the evaluation, and the bundle/checkpoint where small enough."""
    run_dir = work / name
    files = [run_dir / "loss.csv"] + [run_dir / "eval" / f for f in (
        "evaluation.md", "evaluation.csv", "evaluation_boxplots.png", "summary.json", "evaluate.log")]
    files += [run_dir / "model.pt", run_dir / "checkpoint.pt"]  # last: left out when they do not fit
    total = 0
    with tarfile.open(session.out / f"{name}.tar", "w") as tar:
        for path in files:
            if not path.is_file():
                continue
            size = path.stat().st_size
            if total + size + 64 * 1024 > MAX_RETURNED_FILE:
                session.log(f"{path.relative_to(work)} ({size / 2**20:.1f} MiB) does not fit the returned file: left out")
                continue
            tar.add(path, arcname=str(path.relative_to(work)))
            total += size + 1024


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs, work = Path(args.inputs), Path(args.work)
    session = Session(out, args.budget)
    if not torch.cuda.is_available() and not args.allow_cpu:
        session.log("no CUDA GPU visible to torch: nothing to do here")
        return 1
    session.stage("environment", environment)
    if not args.no_checks:
        session.stage("cuda_path", cuda_path, inputs)
        session.stage("benchmark", benchmark, inputs, out, args)
    runs = [r for r in RUNS if not args.runs or r[0] in args.runs.split(",")]
    reserve = 10.0 if args.no_evaluate else 45.0  # the last evaluation and packing after the last training run
    training_time = max(session.left() - reserve, 0.0)
    shares = sum(r[3] for r in runs)
    resume_from = Path(args.resume_from) if args.resume_from else None
    evaluations: list[tuple[str, subprocess.Popen]] = []
    for name, dim, config_name, share in runs:
        seconds = training_time * share / shares
        session.stage(f"train {name}", train_run, inputs, work, name, dim, config_name, seconds, resume_from)
        model = work / name / "model.pt"
        if model.is_file() and not args.no_evaluate:
            log = work / name / "eval" / "evaluate.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "evaluate", "--model", str(model), "--prepared",
                       str(inputs / f"eval{dim}d"), "--out", str(work / name / "eval"), "--title", name]
            if args.eval_pairs:
                command += ["--max-pairs", str(args.eval_pairs)]
            evaluations.append((name, subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)))
        bundle_up(session, work, name)
    for name, process in evaluations:
        try:
            code = process.wait(timeout=max(session.left() - 10.0, 1.0))
        except subprocess.TimeoutExpired:
            process.kill()
            code = "killed at the deadline"
        session.doc["stages"][f"evaluate {name}"] = {"exit": code}
        session.log(f"evaluate {name}: exit {code}")
        if (work / name / "eval" / "summary.json").is_file():
            session.doc["stages"][f"evaluate {name}"]["summary"] = json.loads(
                (work / name / "eval" / "summary.json").read_text())
        bundle_up(session, work, name)
    session.save()
    session.log("session done")
    return 0


def train_configs(args) -> int:
    """``configs``: one process per configuration (``config``), side by side on the GPU, until the budget."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = Session(out, args.budget)
    if not torch.cuda.is_available() and not args.allow_cpu:
        session.log("no CUDA GPU visible to torch: nothing to do here")
        return 1
    session.stage("environment", environment)
    processes = {}
    for name in args.configs.split(","):
        command = [sys.executable, __file__, "config", "--config", name, "--groundtruth", args.groundtruth, "--sdm",
                   args.sdm, "--iterations", str(args.iterations), "--long-iterations", str(args.long_iterations),
                   "--seconds", f"{session.left() - 15.0:.0f}", "--threads", str(args.threads), "--work", args.work,
                   "--out", str(out)]
        if args.resume_from:
            command += ["--resume-from", args.resume_from]
        for change in args.set or []:
            command += ["--set", change]
        processes[name] = subprocess.Popen(command, stdout=(out / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
        session.log(f"started {name}: {' '.join(command)}")
    for name, process in processes.items():
        try:
            code = process.wait(timeout=max(session.left(), 1.0))
        except subprocess.TimeoutExpired:
            process.kill()
            code = "killed at the deadline"
        session.doc["stages"][f"train {name}"] = {"exit": code}
        session.log(f"{name}: exit {code}")
    session.save()
    session.log("session done")
    return 0


def train_config(args) -> None:
    """``config`` (one process of ``configs``): ``--iterations`` batches, then on to ``--long-iterations`` or the
    time limit; each stage's checkpoint copied to ``OUT/<config>-<batches>.pt``."""
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    geometry, sdm, training_set = training_inputs(Path(args.groundtruth), Path(args.sdm))
    run_dir = Path(args.work) / args.config
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.pt"
    start = 0
    if args.resume_from:  # going on from an earlier session's checkpoint of this configuration
        shutil.copy(Path(args.resume_from) / f"{args.config}.pt", checkpoint)
        start = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"])

    def progress(i: int, n: int, info: dict) -> None:
        if i % 1000 == 0:
            print(f"[{time.perf_counter() - t0:6.1f} s] {args.config} {i}/{n} " + " ".join(
                f"{k} {v:.4g}" for k, v in info.items()), flush=True)

    for iterations in (args.iterations, args.long_iterations):
        if iterations <= start:
            continue
        left = args.seconds - (time.perf_counter() - t0) - 10.0  # the last checkpoint's copy
        if left < 20.0:
            break
        config = config_by_name(args.config).with_overrides([*(args.set or []), f"iterations={iterations}"])
        bundle = train(config, training_set, sdm, geometry, torch.device(DEVICE), checkpoint, validation=None,
                       progress=progress, time_limit=left)
        bundle.save(run_dir / "model.pt")
        reached = int(bundle.training["iterations"])
        shutil.copy(checkpoint, Path(args.out) / f"{args.config}-{reached}.pt")
        print(f"[{time.perf_counter() - t0:6.1f} s] {args.config}: {reached} batches, checkpoint "
              f"{args.config}-{reached}.pt; held-out best-action accuracy {bundle.training['held_out_accuracy']:.3f}",
              flush=True)
        if reached < iterations:
            break


# ----------------------------------------------------------------------------------------- report (here)
def report(returned: Path, out: Path) -> None:
    """The paper's architecture against the compact one, trained and evaluated in the same session."""
    session = json.loads((returned / "session.json").read_text())
    gpu = session["stages"]["environment"]["result"]["gpu"]
    lines = ["# The paper's network against the compact (shipped) one", "",
             f"Both trained from scratch on one {gpu} in the same session (`scripts/recipes/gpu_session.py run`, time-boxed: the "
             "same training data, SDM and Eq. 1 targets; the paper's configuration without states along the way, the "
             "compact one with them), then evaluated there with the same protocol (agent 200 steps, seed 0) on the same "
             "prepared validation pairs: all 72 ordered pairs in 2-D; in 3-D 30 (the seeded 24-pair subset and the "
             "benchmark's 8; all 72 did not fit the 64 MB carried to the machine). The compact runs are the first part of "
             "the shipped models' training, which a second session continued (`--resume-from`; see their model cards).",
             "",
             f"Made by `python scripts/recipes/gpu_session.py report --returned {returned} --out {out}`.", "",
             "| run | network | parameters | batches | minutes | held-out best-action accuracy | pairs | ours Dice median "
             "| ours Dice mean | ours HD median | ours % folding | nfc Dice median |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, dim, config_name, _ in RUNS:
        stage = session["stages"].get(f"train {name}", {})
        summary_file = returned / name / "summary.json"
        if not stage.get("ok") or not summary_file.is_file():
            lines.append(f"| {name} | {config_name} | | | | | | failed: see session.json | | | | |")
            continue
        t, s = stage["result"], json.loads(summary_file.read_text())
        size = (100, 100) if dim == 2 else (75, 75, 20)
        actions = round(1 / t["chance_accuracy"])
        parameters = count_parameters(DualStreamQNetwork(NetworkConfig(t["config"]["architecture"], dim, size, actions)))
        lines.append(f"| {name} | {t['config']['architecture']} | {parameters:,} | {t['iterations']} | "
                     f"{t['seconds'] / 60:.1f} | {t['held_out_accuracy']:.2f} | {s['ours']['n']} | "
                     f"{s['ours']['dice']['median']:.3f} | {s['ours']['dice']['mean']:.3f} | "
                     f"{s['ours']['hausdorff']['median']:.1f} | {s['ours']['folding_percent']['mean']:.2f} | "
                     f"{s['nfc']['dice']['median']:.3f} |")
    lines += ["", "Per run: `<run>/evaluation.md` (table), `evaluation.csv` (per pair), `loss.csv` (training curve) in "
              f"`{returned}`.", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="copy the session's inputs into a folder (here)")
    a.add_argument("--into", default="work/gpu_in")
    a.add_argument("--work", default="work", help="the folder of the CPU pipeline's outputs")
    a = sub.add_parser("run", help="the session (on the GPU machine)")
    a.add_argument("--inputs", default="work/gpu_in")
    a.add_argument("--out", required=True)
    a.add_argument("--work", default="/tmp/gpu_session")
    a.add_argument("--budget", type=float, default=540.0, help="seconds for the whole session")
    a.add_argument("--allow-cpu", action="store_true", help="rehearse on a machine without a GPU")
    a.add_argument("--eval-pairs", type=int, default=0, help="evaluate on the first N pairs only (default: all)")
    a.add_argument("--runs", help="comma-separated training runs to do (default: all of " + ", ".join(r[0] for r in RUNS) + ")")
    a.add_argument("--resume-from", help="folder with <run>/checkpoint.pt of an earlier session: go on from there")
    a.add_argument("--no-checks", action="store_true", help="skip the CUDA-path check and the benchmark")
    a.add_argument("--no-evaluate", action="store_true", help="train only (evaluate here afterwards)")
    a.add_argument("--repeats", type=int, default=3, help="benchmark repeats")
    a.add_argument("--bench-batch", type=int, default=72, help="benchmark: pairs in the batched run")
    a.add_argument("--bench-steps", type=int, default=200, help="benchmark: agent steps")
    a.add_argument("--elastix-reference", default=str(REPO / "results" / "benchmark_cpu.json"),
                   help="benchmark: --json of the CPU benchmark on the same prepared pairs")
    a = sub.add_parser("configs", help="train configurations side by side on one ground truth (on the GPU machine)")
    a.add_argument("--groundtruth", required=True, help="a ground-truth folder (pairs, subjects, summary.json)")
    a.add_argument("--sdm", required=True)
    a.add_argument("--configs", default="converge,recover", help="comma-separated training configurations")
    a.add_argument("--iterations", type=int, default=20000, help="the planned batches: the first checkpoint")
    a.add_argument("--long-iterations", type=int, default=200000, help="then on to these, or the budget")
    a.add_argument("--out", required=True)
    a.add_argument("--work", default="/tmp/gpu_configs")
    a.add_argument("--budget", type=float, default=520.0, help="seconds for the whole session")
    a.add_argument("--threads", type=int, default=4, help="CPU threads per process")
    a.add_argument("--allow-cpu", action="store_true", help="rehearse on a machine without a GPU")
    a.add_argument("--resume-from", help="folder with <config>.pt checkpoints of an earlier session: go on from there")
    a.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change a field of every configuration (repeatable; give the same to agentreg train here)")
    a = sub.add_parser("config", help="(internal) one process of configs")
    for name in ("--config", "--groundtruth", "--sdm", "--out", "--work"):
        a.add_argument(name, required=True)
    for name in ("--iterations", "--long-iterations", "--threads"):
        a.add_argument(name, type=int, required=True)
    a.add_argument("--seconds", type=float, required=True)
    a.add_argument("--resume-from")
    a.add_argument("--set", action="append")
    a = sub.add_parser("evaluate", help="(internal) evaluate one trained model")
    a.add_argument("--model", required=True)
    a.add_argument("--prepared", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--title", required=True)
    a.add_argument("--max-pairs", type=int, default=None)
    a = sub.add_parser("report", help="the paper-vs-compact table from the returned files (here)")
    a.add_argument("--returned", default="results/gpu_session")
    a.add_argument("--out", default="results/paper_vs_compact.md")
    args = p.parse_args(argv)
    if args.command == "report":
        report(Path(args.returned), Path(args.out))
        return 0
    if args.command == "pack":
        pack(Path(args.into), Path(args.work))
        return 0
    if args.command == "configs":
        return train_configs(args)
    if args.command == "config":
        train_config(args)
        return 0
    if args.command == "evaluate":
        evaluate_model(Path(args.model), Path(args.prepared), Path(args.out), args.title, args.max_pairs)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
