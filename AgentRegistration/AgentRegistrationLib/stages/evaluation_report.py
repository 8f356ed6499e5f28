"""The report of ``agentreg evaluate``: the paper's Table 1 layout (figures as rows, methods as columns) in markdown
with the notes that say what each method is, the per-pair CSV, the box plots, the JSON record, and the summary lines
it prints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.paths import shown
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.stages.evaluation import EvaluationSettings

FIGURES = ("dice", "hausdorff", "folding_percent", "seconds", "dice_fixed")
"""The figures of every result, and the columns of the per-pair CSV after the pair and the method: ``dice`` and
``hausdorff`` on the model grid (the fixed image's crop, the paper's protocol), ``dice_fixed`` in the fixed image's own
space (3-D models; empty where not measured)."""


def label_figures(results: list[dict]) -> list[str]:
    """The per-label figures (:func:`figures`) found in ``results``, by label value."""
    keys = {k for r in results for k in r if k.startswith(("dice_label_", "hausdorff_label_"))}
    return sorted(keys, key=lambda k: (int(k.rsplit("_", 1)[1]), k))


def report_notes(pairs: list[tuple[str, str]], names: list[str], split: str | Path, data: str | Path, dim: int,
                 geometry: ModelGeometry, settings: EvaluationSettings, model: Path | None, device: torch.device,
                 results: list[dict], failures: list[dict], seconds: float, workers: int) -> list[str]:
    """The notes under an ``agentreg evaluate`` report's table: the pairs, what each method is, the figures, the
    failures and the run's wall time (``seconds``)."""
    prealign_failed = sorted({(r["moving"], r["fixed"]) for r in results if r.get("prealignment", "ok") != "ok"})
    by_label = {(r["moving"], r["fixed"]) for r in results if "fixed label (oracle)" in str(r.get("prealignment", ""))}
    placed = ("by the fixed label (an oracle start: the model has no localiser for these images; train one with "
              "'agentreg localiser' and give it to agentreg train --localiser)" if by_label
              else "by the model's localiser (no fixed label is used)")
    return [
        f"{len(pairs)} ordered pairs of the {len(names)} validation subjects of `{shown(split)}` ({data}), "
        f"{dim}-D" + ((" (the slice nearest each image's organ centre)" if geometry.localised else
                       " (the middle slice of the crop box of the 3-D-aligned pair)") if dim == 2 else "")
        + f"; model grid {'x'.join(map(str, geometry.size))} of the fixed image.",
        (f"- Every method starts from the same crops, each centred on its image's organ and sized to it: the "
         f"moving crop placed by the moving label (the atlas case), the fixed one {placed}; 'localised' is those "
         "crops alone, and its seconds are the localisation's."
         if geometry.localised else
         "- Every method starts from the same translation pre-alignment (elastix, on the 3-D volumes); "
         "T is that pre-alignment alone, and its seconds are the pre-alignment's."),
        "- none: no registration at all (the moving mask where it lies, on the fixed crop).",
        f"- e8 / e16: elastix's default B-spline map (Mattes mutual information, adaptive stochastic gradient "
        f"descent, 3 resolutions, {settings.iterations} iterations each), final grid spacing "
        f"{'x'.join(f'{s / 2:g}' for s in geometry.control_spacing)} / {'x'.join(f'{s:g}' for s in geometry.control_spacing)} "
        "model voxels (e16 is the GT/SDM control grid).",
        f"- our / nfc: the agent, {settings.steps} steps, with / without fuzzy action control "
        + (f"(model `{shown(model)}`, device {device}); seconds = agent time of a batch of up to {settings.batch_size} pairs "
           "divided by its pairs." if model else "(not run)."),
        "- GT: the constrained elastix registration with both masks ("
        + ("MI + bending energy + surface points" if settings.gt_metric == "points" else
           "mean squares of the masks' signed distance maps + bending energy")
        + f", the `{settings.gt_metric}` ground truth, {settings.gt_iterations} iterations x {settings.gt_resolutions} "
        "resolutions: the model's ground truth's where it recorded them): an upper bound, not a method.",
        f"- Two spaces. **Model grid** (the paper's protocol; rows without a space named): Dice of the warped moving "
        f"mask with the fixed mask and Hausdorff distance in model-grid voxels (not mm), both on the fixed crop's "
        f"{'x'.join(map(str, geometry.size))} grid; % folding = voxels with det J <= 0. "
        + ("**Fixed image's space** (rows so named): Dice of the moving label warped onto the fixed image's own grid "
           "by the same deformation (nearest neighbour, as 'agentreg register' writes warped_label.nii.gz; here "
           "pairs/<pair>/warped_label_<method>.nii.gz) with the fixed label: the figure a user measures with their "
           "own tools. It differs from the model grid's: the whole image counts (the organ off the crop too) at "
           "the image's own voxels." if dim == 3 else
           "Dice in the fixed image's own space is measured for 3-D models only."),
        f"- Failed (pair, method): {len(failures)}" + (": " + "; ".join(
            f"{f['moving']}->{f['fixed']} {f['method']}: {f['error']}" for f in failures) if failures else "."),
        *([] if geometry.localised else
          [f"- Pairs whose translation pre-alignment was rejected (no translation applied): {len(prealign_failed)}."]),
        f"- Wall time of this run (cached results are not recomputed): {seconds:.0f} s, {workers} worker(s).",
    ]


def write_report(report: Path, results: list[dict], methods: list[str], dim: int, command: str, notes: list[str],
                 record: dict | None = None) -> dict[str, dict]:
    """An evaluation's files: the markdown ``report`` (Table 1 and ``notes``), the per-pair CSV and the box plots
    beside it (``<report>.csv``, ``<report>_boxplots.png``) and, with ``record``, ``<report>.json`` (the summary and
    ``record``). Returns the summary (:func:`summarise`)."""
    summary = summarise(results, methods)
    csv_path = report.with_suffix(".csv")
    png_path = report.with_name(report.stem + "_boxplots.png")
    write_csv(csv_path, results)
    plot_boxplots(png_path, results, methods, dim)
    gains = gains_over_start(results, methods)
    info = {"dim": dim, "command": command, "notes": notes, "csv": csv_path.name, "png": png_path.name,
            "gains": gains}
    atomic_write(report, lambda tmp: Path(tmp).write_text(report_markdown(summary, methods, info)))
    if record is not None:
        atomic_write(report.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(
            {"summary": summary, "gains": gains, **record}, indent=1)))
    return summary


def summary_lines(summary: dict[str, dict], methods: list[str]) -> list[str]:
    """One line per method: Dice (and per label value, where the labels hold several), Hausdorff, folding, seconds,
    pairs (what ``agentreg evaluate`` prints)."""
    def labels(s: dict) -> str:
        return "".join(f"; label {k.rsplit('_', 1)[1]} {v['median']:.3f}" for k, v in s.items()
                       if k.startswith("dice_label_"))

    def fixed(s: dict) -> str:
        d = s.get("dice_fixed", {"n": 0})
        return f", in the fixed image's space {d['median']:.3f}" if d["n"] else ""

    return [f"{m:>4}: Dice median on the model grid {s['dice']['median']:.3f} (mean {s['dice']['mean']:.3f}"
            f"{labels(s)}){fixed(s)}, Hausdorff "
            f"median {s['hausdorff']['median']:.1f} voxels, folding {s['folding_percent']['mean']:.3f} %, "
            f"{s['seconds']['mean']:.2f} s/pair, {s['n']} pairs" for m, s in ((m, summary[m]) for m in methods)]


def summarise(results: list[dict], methods: list[str]) -> dict[str, dict]:
    """Per method: mean / median / std of Dice and Hausdorff (also per label value, where the labels hold several),
    mean folding % and seconds, n."""
    summary = {}
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        s = {"n": len(rows)}
        for key in (*FIGURES, *label_figures(rows)):
            v = np.array([r[key] for r in rows if key in r], dtype=float)
            v = v[np.isfinite(v)]
            s[key] = ({"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "n": int(v.size)}
                      if v.size else {"mean": math.nan, "median": math.nan, "std": math.nan, "n": 0})
        summary[method] = s
    return summary


METHOD_TITLES = {"none": "none", "T": "T", "localised": "localised", "e8": "e8", "e16": "e16", "ours": "our",
                 "nfc": "nfc", "gt": "GT (upper bound)"}


def report_markdown(summary: dict, methods: list[str], info: dict) -> str:
    """Table 1 layout: figures as rows, methods as columns."""
    rows = [("DICE Mean", "dice", "mean", ".3f"), ("DICE Med.", "dice", "median", ".3f"), ("DICE StD.", "dice", "std", ".3f"),
            ("HD Mean", "hausdorff", "mean", ".1f"), ("HD Med.", "hausdorff", "median", ".1f"),
            ("HD StD.", "hausdorff", "std", ".1f"), ("% folding (det J <= 0), mean", "folding_percent", "mean", ".3f"),
            ("seconds per pair, mean", "seconds", "mean", ".2f"), ("pairs", None, None, "d")]
    lines = [f"# Evaluation on the validation pairs ({info['dim']}-D): the paper's Table 1 protocol", "",
             "Dice on the model grid (the paper's figure) and, where a row says so, in the fixed image's own space "
             "(the notes below say how each is measured).", "",
             "Command:", "", "```", info["command"], "```", "",
             "| | " + " | ".join(METHOD_TITLES[m] for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    labels = sorted({int(k.rsplit("_", 1)[1]) for m in methods for k in summary[m] if k.startswith("dice_label_")})
    per_label = [(f"label {v} alone: {title}", f"{key}_label_{v}", "median", fmt) for v in labels
                 for title, key, fmt in (("DICE Med.", "dice", ".3f"), ("HD Med.", "hausdorff", ".1f"))]
    fixed = [("DICE Mean, fixed image's space", "dice_fixed", "mean", ".3f"),
             ("DICE Med., fixed image's space", "dice_fixed", "median", ".3f")]
    if not any(summary[m].get("dice_fixed", {}).get("n") for m in methods):
        fixed = []
    rows = rows[:3] + fixed + rows[3:6] + per_label + rows[6:]  # after the union's Dice and Hausdorff
    missing = {"median": math.nan}
    for title, key, stat, fmt in rows:
        cells = [format(summary[m]["n"], fmt) if key is None else format(summary[m].get(key, missing)[stat], fmt)
                 for m in methods]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    gains = info.get("gains") or {}
    if gains:
        lines += ["", "What the agent adds to its own start, per pair (Dice after minus Dice of the crops alone, the "
                  "start every method begins from):", "",
                  "| | median gain | mean gain | pairs improved | pairs worse by more than 0.02 | pairs |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {METHOD_TITLES[m]} | {g['median']:+.3f} | {g['mean']:+.3f} | {100 * g['improved']:.0f} % | "
                  f"{100 * g['worse']:.0f} % | {g['n']} |" for m, g in gains.items()]
    lines += ["", *info["notes"], "", f"Per pair: [{info['csv']}]({info['csv']}); box plots: ![box plots]({info['png']})", ""]
    return "\n".join(lines)


WORSE = 0.02
"""A pair is worse than its start when the agent lost more than this much Dice."""


def gains_over_start(results: list[dict], methods: list[str]) -> dict[str, dict]:
    """Per agent method of ``methods``: the per-pair gain of Dice over the start method of the run (``localised`` or
    ``T``, whichever was evaluated) on the pairs both have: median, mean, share improved, share worse by more
    than :data:`WORSE`, n."""
    start = next((m for m in ("localised", "T") if m in methods), None)
    if start is None:
        return {}
    dice = {(r["moving"], r["fixed"], r["method"]): r["dice"] for r in results if "dice" in r}
    out = {}
    for method in (m for m in methods if m in ("ours", "nfc")):
        gain = np.array([d - dice[(m, f, start)] for (m, f, meth), d in dice.items()
                         if meth == method and (m, f, start) in dice], dtype=float)
        if gain.size:
            out[method] = {"median": float(np.median(gain)), "mean": float(gain.mean()),
                           "improved": float((gain > 0).mean()), "worse": float((gain < -WORSE).mean()),
                           "n": int(gain.size)}
    return out


def write_csv(path: Path, results: list[dict]) -> None:
    header = ["moving", "fixed", "method", *FIGURES, "prealignment", *label_figures(results)]
    lines = [",".join(header)] + [",".join(str(r.get(k, "")) if k in ("moving", "fixed", "method", "prealignment")
                                           else f"{r[k]:.6g}" if k in r else "" for k in header) for r in results]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def plot_boxplots(path: Path, results: list[dict], methods: list[str], dim: int) -> None:
    import matplotlib  # seconds to import: only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.3 * len(methods), 4))
    for ax, key, title in zip(axes, ("dice", "hausdorff"), ("Dice", "Hausdorff (model-grid voxels)"), strict=True):
        data = []
        for m in methods:
            v = np.array([r[key] for r in results if r["method"] == m], dtype=float)
            data.append(v[np.isfinite(v)])
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), [METHOD_TITLES[m].split(" ")[0] for m in methods])
        ax.set_title(f"{title}, {dim}-D")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
