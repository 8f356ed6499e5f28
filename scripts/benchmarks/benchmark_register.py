"""Benchmark registration speed: the agent against elastix B-spline, on the same real preprocessed pairs.

Everything runs in this one process, on pairs of the shared PROMISE12 ``grid128`` volumes (the validation
subjects of Resources/promise12_split.json), preprocessed once as ``agentreg register`` does it (elastix
translation pre-alignment, crop box, model grid, intensity normalisation); preprocessing is not timed.

Per model dimension (3-D and/or 2-D; a 2-D pair is the middle axial slice of the volumes):

* agent: ``--steps`` (200) MDP steps for one pair, fuzzy action control on, no early stop;
* elastix: ``AgentRegistrationLib.elastix.wrapper.register`` with ``bspline_map(control spacing of the model)``
  (16x16[x8] model voxels, the SDM's control grid; elastix's default B-spline map: Mattes mutual information,
  adaptive stochastic gradient descent, 3 resolutions, 500 iterations each) on the same preprocessed pair,
  i.e. after the same translation;
* ratio agent / elastix;
* batched: ``--batch`` pairs (the distinct pairs, cycled) in one agent batch, seconds in total and per pair;
* peak memory of one pair's agent run: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the increase of
  the process's peak resident memory (VmHWM of /proc/self/status, reset through /proc/self/clear_refs when the
  kernel allows it; otherwise the increase over the peak so far, which can read 0).

One-off warm-up is excluded from every timing: importing itk/elastix and one short elastix run, and a few agent
steps (first network call, allocator) are done before the clocks start. Times are the median of ``--repeats``.

With ``--prepared DIR`` (an ``agentreg evaluate`` output folder; repeatable, one per dimension) the pairs are
the evaluation's cached preprocessed pairs (sorted by name) instead, so the benchmark needs neither the raw data
nor SimpleITK: on a machine without itk-elastix (a bare GPU machine) elastix is not run, and
``--elastix-reference FILE`` (the ``--json`` of a run of this script on another machine, on the same prepared
pairs) gives the elastix seconds of the ratio, named as measured there.

    python scripts/benchmarks/benchmark_register.py [--model M.pt ...] [--device auto|cpu|cuda] [--batch 56] [--markdown]
                                         [--prepared DIR ...] [--elastix-reference FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "promise12" / "grid128"
SPLIT = REPO / "Resources" / "promise12_split.json"
SHIPPED = {3: REPO / "Resources" / "Models" / "prostate-3d.pt", 2: REPO / "Resources" / "Models" / "prostate-2d.pt"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model bundle (.pt), repeatable (one 2-D and/or one 3-D); "
                   "default: Resources/Models/prostate-3d.pt and prostate-2d.pt where they exist")
    p.add_argument("--data", default=str(DATA), help="grid128 folder (default: ../shared/data/promise12/grid128)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--steps", type=int, default=200, help="agent steps (default 200, the paper's)")
    p.add_argument("--batch", type=int, default=56, help="pairs in the batched run (default 56)")
    p.add_argument("--pairs", type=int, default=8, help="distinct real pairs to preprocess (cycled up to --batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--elastix-iterations", type=int, default=None,
                   help="elastix iterations per resolution (default: the wrapper's, 500)")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table for the README")
    p.add_argument("--prepared", action="append", help="'agentreg evaluate' output folder whose cached preprocessed "
                   "pairs are used instead of preprocessing the raw data (repeatable: one per dimension)")
    p.add_argument("--elastix-reference", help="--json output of a run of this script elsewhere (same --prepared "
                   "pairs): elastix seconds for the ratio where elastix is not installed here")
    p.add_argument("--json", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pairs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, not {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------------------- environment
def device_text(device: torch.device) -> str:
    """The device as this benchmark names it: the hardware with CUDA's version or torch's CPU threads."""
    from AgentRegistrationLib.model.devices import device_name

    if device.type == "cuda":
        return f"{device_name(device)} (CUDA {torch.version.cuda})"
    return f"{device_name(device)}, {torch.get_num_threads()} torch threads"


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- data
def load_pairs(data: Path, dim: int, geometry, count: int) -> list:
    """``count`` ordered pairs of the validation subjects, preprocessed as ``agentreg register`` does."""
    import SimpleITK as sitk
    from AgentRegistrationLib.data.organ_box import localisation_from_label
    from AgentRegistrationLib.data.preprocessing import middle_slice, prepare_pair

    names = json.loads(SPLIT.read_text())["validation"]
    names = [n for n in names if (data / f"{n}_image.nii.gz").is_file()]
    if len(names) < 2:
        sys.exit(f"benchmark: fewer than 2 validation subjects found in {data}")
    pairs = []
    for fixed_name, moving_name in list(permutations(names, 2))[:count]:
        images, places = [], []
        for name in (fixed_name, moving_name):
            image = sitk.ReadImage(str(data / f"{name}_image.nii.gz"))
            label = sitk.ReadImage(str(data / f"{name}_label.nii.gz"))
            images.append(middle_slice(image) if dim == 2 else image)
            places.append(localisation_from_label(middle_slice(label) if dim == 2 else label))  # crops on the organ
        pair = prepare_pair(images[0], images[1], geometry, fixed_localisation=places[0], moving_localisation=places[1])
        pair.info["names"] = (moving_name, fixed_name)
        pairs.append(pair)
    return pairs


@dataclass
class CachedPair:
    """A pair preprocessed by ``agentreg evaluate`` (its ``prepared.npz``), on the model grid."""

    fixed: np.ndarray
    moving: np.ndarray
    info: dict


def load_prepared_pairs(folders: list[str], geometry, count: int) -> list[CachedPair] | None:
    """The first ``count`` cached pairs (sorted by name) of the first folder that has pairs on ``geometry``'s grid."""
    from AgentRegistrationLib.stages.evaluation_pairs import prepared_pairs

    for folder in folders:
        pairs = prepared_pairs(folder, geometry, count)
        if pairs:
            return [CachedPair(pair["fixed"], pair["moving"], {"names": names}) for names, pair in pairs]
    return None


def stack(pairs: list, key: str, count: int, device: torch.device) -> torch.Tensor:
    arrays = [getattr(pairs[i % len(pairs)], key) for i in range(count)]
    return torch.as_tensor(np.stack(arrays), device=device)[:, None]


# ----------------------------------------------------------------------------------------- timing
def median_seconds(run, repeats: int, device: torch.device) -> float:
    from AgentRegistrationLib.model.devices import synchronize

    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(run, device: torch.device) -> dict:
    """Peak memory of ``run()`` (one pair's agent run)."""
    from AgentRegistrationLib.model.devices import synchronize

    if device.type == "cuda":
        run()  # warm-up: the measured run then holds only what registration itself needs
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / 2**20, "increase_mib": (peak - base) / 2**20,
                "how": "torch.cuda.max_memory_allocated during one pair's run, after a warm-up run"}
    # CPU: the process's first agent run, so that memory that the allocator keeps after a run is counted
    reset = _reset_peak_rss()
    before_rss, before_hwm = _status_kb("VmRSS") or 0, _status_kb("VmHWM") or 0
    run()
    after_hwm = _status_kb("VmHWM") or 0
    return {"peak_mib": after_hwm / 1024, "increase_mib": (after_hwm - (before_rss if reset else before_hwm)) / 1024,
            "how": "increase of this process's peak resident memory (VmHWM, /proc/self/status) during its first "
                   "agent run (includes one-off first-call allocations), " + (
                       "peak reset before the run" if reset else "peak not resettable here: over the earlier peak, may read 0")}


def reference_elastix(reference: str | None, dim: int, pair: str) -> dict | None:
    """Elastix seconds of the same pair from another machine's ``--json``."""
    if not reference:
        return None
    doc = json.loads(Path(reference).read_text())
    for r in doc["results"]:
        if r["dim"] == dim and r["pair"] == pair and r.get("elastix_s"):
            return {"seconds": r["elastix_s"], "where": doc["device_name"]}
    sys.exit(f"benchmark: {reference} has no elastix time of the {dim}-D pair {pair}")


def benchmark_model(model: Path, args, device: torch.device) -> dict:
    from AgentRegistrationLib.core.agent import AgentSettings
    from AgentRegistrationLib.model.bundle import load_bundle

    bundle = load_bundle(model)
    dim = bundle.dim
    pairs = load_prepared_pairs(args.prepared, bundle.geometry, args.pairs) if args.prepared else None
    if args.prepared and pairs is None:
        sys.exit(f"benchmark: no prepared {dim}-D pairs in {', '.join(args.prepared)}")
    if pairs is None:
        print(f"[{dim}-D] preprocessing {args.pairs} real pairs (not timed) ...", file=sys.stderr)
        pairs = load_pairs(Path(args.data), dim, bundle.geometry, args.pairs)
    pair_name = "->".join(pairs[0].info["names"])
    try:
        from AgentRegistrationLib.elastix import wrapper as elastix
        from AgentRegistrationLib.elastix.wrapper import model_image
    except ImportError:  # no itk-elastix / SimpleITK on this machine
        elastix = None
    agent = bundle.agent(device)
    settings = bundle.agent_settings(steps=args.steps, seed=0)
    fixed1, moving1 = stack(pairs, "fixed", 1, device), stack(pairs, "moving", 1, device)
    fixedn, movingn = stack(pairs, "fixed", args.batch, device), stack(pairs, "moving", args.batch, device)

    spacing = bundle.geometry.control_spacing
    iterations = args.elastix_iterations or 500
    if elastix is not None:
        fixed_image, moving_image = model_image(pairs[0].fixed), model_image(pairs[0].moving)
        elastix.register(fixed_image, moving_image, [elastix.bspline_map(spacing, iterations=5)])  # warm-up: itk
    memory = peak_memory(lambda: agent.run(fixed1, moving1, settings), device)
    # warm-up (not timed): first network calls and allocations, for one pair and for the batch
    agent.run(fixed1, moving1, AgentSettings(steps=3))
    agent.run(fixedn, movingn, AgentSettings(steps=2))

    agent_s = median_seconds(lambda: agent.run(fixed1, moving1, settings), args.repeats, device)
    batch_s = median_seconds(lambda: agent.run(fixedn, movingn, settings), args.repeats, device)
    if elastix is not None:
        bspline = elastix.bspline_map(spacing, iterations=iterations)
        elastix_s = median_seconds(lambda: elastix.register(fixed_image, moving_image, [bspline]), args.repeats, device)
        elastix_where = "here"
    else:
        ref = reference_elastix(args.elastix_reference, dim, pair_name)
        elastix_s, elastix_where = (ref["seconds"], ref["where"]) if ref else (None, "not run (no itk-elastix here)")
    return {
        "dim": dim, "model": str(model), "architecture": bundle.network.config.architecture,
        "modes": bundle.sdm.num_modes, "grid": list(bundle.geometry.size), "pair": pair_name,
        "agent_s": agent_s, "elastix_s": elastix_s, "elastix_where": elastix_where,
        "ratio": agent_s / elastix_s if elastix_s else None,
        "batch": args.batch, "distinct_pairs": len(pairs), "batch_s": batch_s, "batch_per_pair_s": batch_s / args.batch,
        "memory": memory, "elastix": {"spacing": list(spacing), "iterations": iterations, "resolutions": 3,
                                      "metric": "AdvancedMattesMutualInformation"},
    }


# ----------------------------------------------------------------------------------------- report
def _seconds(value: float | None, digits: int, unit: str = " s") -> str:
    return "not measured" if value is None else f"{value:.{digits}f}{unit}"


def _where(r: dict) -> str:
    return "" if r["elastix_where"] == "here" or r["elastix_s"] is None else f" (on {r['elastix_where']})"


def report_text(results: list[dict], device: torch.device, args) -> str:
    lines = [f"device: {device} = {device_text(device)}; elastix (itk-elastix) threads: its default (all cores), "
             "on this machine unless said otherwise",
             f"agent: {args.steps} steps, fuzzy action control, seed 0, no early stop; median of {args.repeats} runs; "
             "warm-up (itk import, first elastix run, first network calls) excluded"]
    for r in results:
        e = r["elastix"]
        lines += [
            f"[{r['dim']}-D] model {r['model']} ({r['architecture']}, d = {r['modes']}, grid {'x'.join(map(str, r['grid']))}); "
            f"pair {r['pair']} (moving->fixed)",
            f"  agent, 1 pair:              {r['agent_s']:.3f} s",
            f"  elastix B-spline, 1 pair:   {_seconds(r['elastix_s'], 3)}  (spacing "
            f"{'x'.join(f'{s:g}' for s in e['spacing'])} model voxels, Mattes MI, {e['resolutions']} resolutions x "
            f"{e['iterations']} iterations, after the same translation; measured: {r['elastix_where']})",
            f"  ratio agent / elastix:      {_seconds(r['ratio'], 3, '')}",
            f"  agent, batch of {r['batch']} pairs:  {r['batch_s']:.3f} s total, {r['batch_per_pair_s']:.4f} s per pair "
            f"({r['distinct_pairs']} distinct pairs, cycled)",
            f"  peak memory, 1 pair:        {r['memory']['peak_mib']:.0f} MiB peak, +{r['memory']['increase_mib']:.0f} MiB "
            f"({r['memory']['how']})",
        ]
    return "\n".join(lines)


def report_markdown(results: list[dict], device: torch.device, args) -> str:
    lines = [f"Registration time on {device_text(device)} ({args.steps} agent steps; elastix B-spline at the SDM's "
             "control spacing after the same translation; warm-up excluded; median of "
             f"{args.repeats}).", "",
             "| model | agent, 1 pair (s) | elastix B-spline, 1 pair (s) | agent / elastix | "
             f"agent, batch of {args.batch} (s total / per pair) | peak memory, 1 pair (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        mem = r["memory"]
        lines.append(f"| {r['dim']}-D {r['architecture']} ({'x'.join(map(str, r['grid']))}, d = {r['modes']}) | "
                     f"{r['agent_s']:.2f} | {_seconds(r['elastix_s'], 2, '')}{_where(r)} | {_seconds(r['ratio'], 2, '')} | "
                     f"{r['batch_s']:.2f} / {r['batch_per_pair_s']:.3f} | +{mem['increase_mib']:.0f} "
                     f"({'GPU allocated' if device.type == 'cuda' else 'resident'}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not args.prepared and not data.is_dir():
        sys.exit(f"benchmark: real PROMISE12 data not found at {data}: put the shared data folder beside the repo "
                 "(../shared/data/promise12/grid128) or pass --data")
    models = [Path(m) for m in args.model] if args.model else [p for p in SHIPPED.values() if p.is_file()]
    if not models:
        sys.exit("benchmark: no model bundle: Resources/Models/prostate-3d.pt / prostate-2d.pt do not exist; "
                 "pass --model BUNDLE.pt")
    for m in models:
        if not m.is_file():
            sys.exit(f"benchmark: model bundle not found: {m}")
    from AgentRegistrationLib.model.devices import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        sys.exit(f"benchmark: {err}")
    results = [benchmark_model(m, args, device) for m in models]
    print(report_text(results, device, args))
    if args.json:
        doc = {"device": str(device), "device_name": device_text(device), "steps": args.steps, "repeats": args.repeats,
               "torch": torch.__version__, "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        print()
        print(report_markdown(results, device, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
