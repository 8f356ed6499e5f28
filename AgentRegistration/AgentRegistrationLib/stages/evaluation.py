"""The paper's Table 1 protocol on held-out subjects: every method on the same preprocessed pairs.

For every ordered pair (moving m -> fixed n) of the validation subjects:

1. Preprocessing, shared by all methods: translation pre-alignment of m onto n with elastix on
   the 3-D volumes (:func:`preprocessing.prealign_translation`), then both resampled onto n's
   model grid (:func:`dataset.subject_frame`: the crop box, 100x100 middle slice in 2-D,
   75x75x20 in 3-D) and intensity-normalised.
2. Methods, each giving a displacement on the model grid:

   - ``T``: the translation only (the starting point of every other method);
   - ``e8`` / ``e16``: elastix B-spline (elastix's default B-spline map: Mattes mutual information,
     adaptive stochastic gradient descent, 3 resolutions), final grid spacing 8x8(x4) / 16x16(x8)
     model voxels, i.e. half / the same grid as the GT and the SDM;
   - ``ours``: the agent with the model's settings (its own number of steps unless ``--steps`` is given,
     its stop rule), fuzzy action control; ``nfc``: the same without it;
   - ``gt``: the constrained elastix registration that made the training ground truth (MI + bending
     energy + corresponding mask-surface points), which sees both masks: an upper bound.

3. Figures in model space (the fixed image's model grid): Dice of the warped moving mask with the
   fixed mask, Hausdorff distance in model-grid voxels, % of voxels with det J <= 0, seconds; and, for a 3-D model,
   Dice in the fixed image's own space (``dice_fixed``: the moving label warped onto the fixed image's grid by the
   same deformation, as ``agentreg register`` writes it; the warped label is written beside the results).

Each (pair, method) result is cached as one JSON file with the settings that made it; a rerun
loads what matches and computes only the rest. The shared preprocessing is :mod:`.evaluation_pairs`'s, the report
:mod:`.evaluation_report`'s.

The module imports without SimpleITK and itk (a GPU machine evaluates prepared pairs without them): the worker jobs
and the functions that register with elastix import them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.paths import how_to_get_a_model, shipped_model
from AgentRegistrationLib.contract.training_folder import GT_ITERATIONS, GT_RESOLUTIONS
from AgentRegistrationLib.core.bspline import bspline_field
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice, jacobian_statistics, per_label, surface_distances
from AgentRegistrationLib.core.warp import warp_label
from AgentRegistrationLib.data.pairs import ordered_pairs
from AgentRegistrationLib.elastix.baselines import BASELINE_ITERATIONS, baseline_spacing, register_baseline
from AgentRegistrationLib.elastix.constrained import register_constrained
from AgentRegistrationLib.model.bundle import ModelBundle, load_bundle
from AgentRegistrationLib.model.devices import synchronize
from AgentRegistrationLib.stages.evaluation_pairs import (
    WARPED_LABEL,
    fixed_space,
    fixed_space_figures,
    load_elastix,
    load_prepared,
    localiser_hash,
    pair_dir,
    prepare_evaluation_pair,
    save_prepared,
)

if TYPE_CHECKING:
    from AgentRegistrationLib.data.dataset import Subject

METHODS = ("none", "T", "localised", "e8", "e16", "ours", "nfc", "gt")
START_METHODS = ("T", "localised")  # the start of every other method: the paper's translation, or the organ's boxes
ELASTIX_METHODS = ("e8", "e16", "gt")
AGENT_METHODS = ("ours", "nfc")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvaluationSettings:
    steps: int = 200  # agent steps (ours, nfc)
    seed: int = 0  # agent seed
    iterations: int = BASELINE_ITERATIONS  # elastix iterations per resolution for e8 / e16
    gt_iterations: int = GT_ITERATIONS  # for gt: those of the model's ground truth (gt_settings)
    gt_resolutions: int = GT_RESOLUTIONS
    gt_metric: str = "points"  # for gt: the metric of the model's ground truth (GT_METRICS)
    batch_size: int = 16  # pairs per agent batch
    similarity_guard: bool = True  # ours / nfc: keep the start when the end is no more alike (AgentSettings)


def parse_methods(text: str, geometry: ModelGeometry | None = None) -> list[str]:
    """``"T,e16,ours"`` -> ordered, checked list; ``"all"`` -> every method. The start reference is ``T`` for the
    paper's preprocessing and ``localised`` for crops on the organ: the other one is dropped for ``geometry``."""
    wrong_start = None if geometry is None else ("T" if geometry.localised else "localised")
    if text.strip().lower() == "all":
        return [m for m in METHODS if m != wrong_start]
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise ValueError(f"--methods {text!r}: unknown method(s) {unknown}; choose from {', '.join(METHODS)} or 'all'")
    if wrong_start in chosen:
        raise ValueError(f"--methods: {wrong_start} is not the start of this model's preprocessing; use "
                         f"{'localised' if wrong_start == 'T' else 'T'}")
    return [m for m in METHODS if m in chosen]


def select_pairs(names: list[str], max_pairs: int = 0, pairs: str | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """Every ordered pair (moving, fixed) of ``names``; or the ``pairs`` given as
    ``"MOVING:FIXED,..."``; or a seeded random subset of at most ``max_pairs``."""
    if pairs:
        chosen = []
        for item in pairs.split(","):
            m, sep, f = item.strip().partition(":")
            if not sep or m not in names or f not in names or m == f:
                raise ValueError(f"--pairs: {item!r} is not MOVING:FIXED with two different subjects of {names}")
            chosen.append((m, f))
        return chosen
    return ordered_pairs(names, max_pairs, seed)


# ----------------------------------------------------------------------------------------- figures
def figures(warped_label: np.ndarray, fixed_label: np.ndarray, displacement: np.ndarray | None) -> dict:
    """Dice, Hausdorff (model-grid voxels; NaN if a mask is empty) of the union of the labels and % folding of
    ``displacement`` ``(dim, *spatial)`` in model voxels (0 for none); when the labels hold several values, also
    Dice and Hausdorff of each value alone (``dice_label_<n>``, ``hausdorff_label_<n>``)."""
    out = {"dice": dice(warped_label, fixed_label), "hausdorff": float("nan"), "folding_percent": 0.0}
    if np.any(warped_label) and np.any(fixed_label):
        out["hausdorff"] = surface_distances(np.asarray(warped_label) > 0, np.asarray(fixed_label) > 0)["hausdorff"]
    for value, figs in per_label(warped_label, fixed_label).items():
        out[f"dice_label_{value}"] = figs["dice"]
        out[f"hausdorff_label_{value}"] = figs.get("hausdorff", float("nan"))
    if displacement is not None:
        out["folding_percent"] = jacobian_statistics(np.asarray(displacement, dtype=np.float64))["folding_percent"]
    return out


def run_elastix_method(method: str, pair: dict, geometry: ModelGeometry, settings: EvaluationSettings,
                       labels: tuple[str, str, Path] | None = None) -> dict:
    """e8 / e16 (:mod:`.baselines`) / gt on one prepared pair (model-space arrays); with ``labels`` (the fixed and
    the moving label files and the pair's folder), also the figures in the fixed image's space
    (:func:`evaluation_pairs.fixed_space_figures`)."""
    load_elastix()
    start = time.perf_counter()
    if method == "gt":
        coefficients = register_constrained(pair["fixed"], pair["moving"], pair["fixed_label"], pair["moving_label"],
                                            geometry, iterations=settings.gt_iterations,
                                            resolutions=settings.gt_resolutions, metric=settings.gt_metric)
        grid = geometry.control_grid()
    else:
        coefficients, grid = register_baseline(method, pair["fixed"], pair["moving"], geometry, settings.iterations)
    seconds = time.perf_counter() - start
    u = bspline_field(coefficients, grid, grid.image_bases(geometry.size, dtype=torch.float64))
    out = {**figures(warp_label(pair["moving_label"], u), pair["fixed_label"], u.numpy()), "seconds": seconds}
    if labels is not None and fixed_space(pair, geometry):
        out.update(fixed_space_figures(labels[0], labels[1], pair, coefficients, grid,
                                       Path(labels[2]) / WARPED_LABEL.format(method=method)))
    return out


def method_signature(method: str, geometry: ModelGeometry, settings: EvaluationSettings, model_hash: str | None,
                     localiser: str = "") -> dict:
    """What a cached result must match to be reused."""
    sig = {"method": method, "geometry": geometry.to_dict()}
    if localiser:
        sig["localiser"] = localiser
    if method in ("e8", "e16"):
        sig.update(spacing=list(baseline_spacing(method, geometry)), iterations=settings.iterations)
    elif method == "gt":
        sig.update(iterations=settings.gt_iterations)
        if settings.gt_resolutions != 3:  # results cached before the choice ran 3
            sig.update(resolutions=settings.gt_resolutions)
        if settings.gt_metric != "points":  # results cached before the choice are the paper's metric's
            sig.update(metric=settings.gt_metric)
    elif method in AGENT_METHODS:
        sig.update(model=model_hash, steps=settings.steps, seed=settings.seed, similarity_guard=settings.similarity_guard)
    return json.loads(json.dumps(sig))


def _load_result(path: Path, signature: dict) -> dict | None:
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("signature") == signature else None


def _save_result(path: Path, result: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))


# ----------------------------------------------------------------------------------------- worker jobs
def _prepare_job(args) -> tuple[str, str, dict]:
    fixed, moving, geometry_dict, path, localiser_path = args
    from AgentRegistrationLib.elastix.wrapper import single_threaded_worker  # itk (see the module's docstring)

    single_threaded_worker()
    pair = prepare_evaluation_pair(fixed, moving, ModelGeometry.from_dict(geometry_dict), localiser_path)
    save_prepared(Path(path), pair)
    return moving.name, fixed.name, {"prealignment": pair["prealignment"]}


def _elastix_job(args) -> dict:
    method, prepared_path, geometry_dict, settings_dict, labels = args
    from AgentRegistrationLib.elastix.wrapper import single_threaded_worker  # itk (see the module's docstring)

    single_threaded_worker()
    geometry = ModelGeometry.from_dict(geometry_dict)
    pair = load_prepared(Path(prepared_path), geometry)
    return run_elastix_method(method, pair, geometry, EvaluationSettings(**settings_dict), labels)


def _run_jobs(function, jobs: list, workers: int, on_done: Callable[[object, object, str | None], None]) -> None:
    """``function(job)`` for every job, in a process pool (``spawn``: safe after torch ran) or,
    with one worker, here; ``on_done(job, result, error)`` after each."""
    if workers <= 1:
        for job in jobs:
            try:
                result, error = function(job), None
            except Exception as err:  # noqa: BLE001 - reported per pair, never stops the run
                result, error = None, f"{type(err).__name__}: {err}"
            on_done(job, result, error)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(function, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                result, error = future.result(), None
            except Exception as err:  # noqa: BLE001 - reported per pair, never stops the run
                result, error = None, f"{type(err).__name__}: {err}"
            on_done(futures[future], result, error)


# ----------------------------------------------------------------------------------------- the protocol
def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def evaluate(
    subjects: dict[str, Subject],
    pairs: list[tuple[str, str]],
    geometry: ModelGeometry,
    out: Path,
    methods: list[str],
    settings: EvaluationSettings,
    model: str | Path | None = None,
    device: torch.device | None = None,
    workers: int = 1,
    progress: Progress | None = None,
    localiser: str | Path | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run ``methods`` on ``pairs`` (moving, fixed); returns (results, failures), one result
    dict per (pair, method) with the figures, cached under ``out/pairs``. With crops on the organ, the fixed
    crops are placed by the localiser of ``localiser`` (a bundle or localiser file), else by the fixed label."""
    localiser = str(localiser) if localiser and geometry.localised else None
    run = _EvaluationRun(Path(out), pairs, geometry, settings, progress or (lambda stage, done, total: None),
                         placed_by=localiser_hash(localiser, 3))  # the evaluation reads volumes (a 2-D model: a slice)
    run.prepare(subjects, localiser, workers)  # 1. shared preprocessing
    run.model_hash = file_hash(model) if model and any(m in AGENT_METHODS for m in methods) else None
    todo = run.load_cached(methods)
    run.start_methods(todo)  # 2. none, and T / localised: the preprocessed pair itself
    run.elastix_methods(todo, workers)  # 3. elastix methods in a process pool
    agent_todo = [(method, p) for method in AGENT_METHODS for p in todo.get(method, [])]
    if agent_todo:  # 4. the agent, batched
        if model is None:
            raise ValueError("methods ours/nfc need a model bundle (--model)")
        run_agent_methods(agent_todo, run.prepared_path, geometry, model, device or torch.device("cpu"), settings,
                          run.store, run.progress, run.fixed_space_figures)
    ordered = [run.results[(m, f, method)] for m, f in pairs for method in methods if (m, f, method) in run.results]
    return ordered, run.failures


class _EvaluationRun:
    """The steps of :func:`evaluate` on one output folder, and what they share: the prepared pairs' files, the
    results by ``(moving, fixed, method)`` and the failures."""

    def __init__(self, out: Path, pairs: list[tuple[str, str]], geometry: ModelGeometry, settings: EvaluationSettings,
                 progress: Progress, placed_by: str):
        self.out, self.pairs, self.geometry, self.settings, self.progress = out, pairs, geometry, settings, progress
        self.placed_by = placed_by
        self.model_hash: str | None = None
        self.prepared_path = {p: pair_dir(out, *p) / "prepared.npz" for p in pairs}
        self.ready: list[tuple[str, str]] = []
        self.subjects: dict[str, Subject] = {}
        self.fixed_space = geometry.dim == 3  # Dice in the fixed image's own space too (a 3-D model)
        self.results: dict[tuple[str, str, str], dict] = {}
        self.failures: list[dict] = []

    def prepare(self, subjects: dict[str, Subject], localiser: str | None, workers: int) -> None:
        """The shared preprocessing of every pair not cached yet; ``ready``: the pairs whose preparation exists."""
        pairs, self.subjects = self.pairs, subjects
        cached = {p: load_prepared(self.prepared_path[p], self.geometry, self.placed_by) for p in pairs}
        todo = [p for p in pairs if cached[p] is None or (self.fixed_space and not fixed_space(cached[p], self.geometry))]
        done = len(pairs) - len(todo)
        self.progress("preprocess", done, len(pairs))

        def prepared_done(job, result, error):
            nonlocal done
            done += 1
            if error:
                self.failures.append({"moving": job[1].name, "fixed": job[0].name, "method": "preprocessing",
                                      "error": error})
            self.progress("preprocess", done, len(pairs))

        _run_jobs(_prepare_job, [(subjects[f], subjects[m], self.geometry.to_dict(), str(self.prepared_path[(m, f)]),
                                  localiser) for m, f in todo], workers, prepared_done)
        self.ready = [p for p in pairs if self.prepared_path[p].is_file()]

    def signature(self, method: str) -> dict:
        return method_signature(method, self.geometry, self.settings, self.model_hash, self.placed_by)

    def load_cached(self, methods: list[str]) -> dict[str, list[tuple[str, str]]]:
        """Load the cached results that match; returns the ready pairs still to run, by method."""
        todo: dict[str, list[tuple[str, str]]] = {}
        for method in methods:
            sig = self.signature(method)
            for m, f in self.ready:
                cached = _load_result(pair_dir(self.out, m, f) / f"{method}.json", sig)
                if cached is not None and (not self.fixed_space or "dice_fixed" in cached):
                    self.results[(m, f, method)] = cached
                else:
                    todo.setdefault(method, []).append((m, f))
        return todo

    def store(self, m: str, f: str, method: str, figs: dict, extra: dict | None = None) -> None:
        r = {"moving": m, "fixed": f, "method": method, **figs, **(extra or {}), "signature": self.signature(method)}
        _save_result(pair_dir(self.out, m, f) / f"{method}.json", r)
        self.results[(m, f, method)] = r

    def labels(self, m: str, f: str) -> tuple[str, str, str] | None:
        """The fixed and moving label files of the pair and its folder, for the figures in the fixed image's space
        (``None`` where they are not measured)."""
        if not self.fixed_space:
            return None
        return str(self.subjects[f].label), str(self.subjects[m].label), str(pair_dir(self.out, m, f))

    def fixed_space_figures(self, m: str, f: str, method: str, pair: dict, coefficients: np.ndarray | None,
                            grid) -> dict:
        """:func:`evaluation_pairs.fixed_space_figures` of one pair and method (``{}`` where not measured)."""
        labels = self.labels(m, f)
        if labels is None or not fixed_space(pair, self.geometry):
            return {}
        return fixed_space_figures(labels[0], labels[1], pair, coefficients, grid,
                                   Path(labels[2]) / WARPED_LABEL.format(method=method))

    def start_methods(self, todo: dict[str, list[tuple[str, str]]]) -> None:
        """none, and T / localised: the preprocessed pair itself (its time is the pre-alignment's or
        localisation's)."""
        for method in ("none", *START_METHODS):
            for m, f in todo.get(method, []):
                pair = load_prepared(self.prepared_path[(m, f)], self.geometry)
                label = pair["unregistered_label"] if method == "none" else pair["moving_label"]
                grid = self.geometry.control_grid()
                start = None if method == "none" else np.zeros(grid.num_coefficients)  # the crops alone
                self.store(m, f, method, {**figures(label, pair["fixed_label"], None),
                                          "seconds": 0.0 if method == "none" else pair["seconds"],
                                          **self.fixed_space_figures(m, f, method, pair, start, grid)},
                           {"prealignment": pair["prealignment"]})

    def elastix_methods(self, todo: dict[str, list[tuple[str, str]]], workers: int) -> None:
        """e8, e16 and gt, in a process pool."""
        jobs = [(method, str(self.prepared_path[p]), self.geometry.to_dict(), asdict(self.settings), self.labels(*p))
                for method in ELASTIX_METHODS for p in todo.get(method, [])]
        if not jobs:
            return
        done = 0
        self.progress("elastix", 0, len(jobs))
        names = {str(self.prepared_path[p]): p for p in self.ready}

        def elastix_done(job, result, error):
            nonlocal done
            done += 1
            m, f = names[job[1]]
            if error:
                self.failures.append({"moving": m, "fixed": f, "method": job[0], "error": error})
            else:
                self.store(m, f, job[0], result)
            self.progress("elastix", done, len(jobs))

        _run_jobs(_elastix_job, jobs, workers, elastix_done)


def run_agent_methods(todo: list[tuple[str, tuple[str, str]]], prepared_path: dict, geometry: ModelGeometry,
                      model: str | Path, device: torch.device, settings: EvaluationSettings,
                      store: Callable, progress: Progress, fixed_space_of: Callable | None = None) -> None:
    """ours / nfc in batches of ``settings.batch_size`` pairs; seconds per pair = the batch's
    agent time / the number of pairs in the batch. ``fixed_space_of(moving, fixed, method, pair, coefficients, grid)``:
    the figures in the fixed image's space, added to each result."""
    bundle = load_bundle(model)
    if bundle.geometry != geometry:
        raise ValueError(f"{model} was trained on model geometry {bundle.geometry.to_dict()}, but the evaluation uses "
                         f"{geometry.to_dict()}: evaluate with the model's dimension (--dim {bundle.dim})")
    agent = bundle.agent(device)
    done = 0
    progress("agent", 0, len(todo))
    for method in AGENT_METHODS:
        items = [p for meth, p in todo if meth == method]
        agent_settings = bundle.agent_settings(steps=settings.steps, seed=settings.seed,
                                            fuzzy_action_control=method == "ours",
                                            similarity_guard=settings.similarity_guard)
        for start in range(0, len(items), settings.batch_size):
            batch = items[start:start + settings.batch_size]
            pairs = [load_prepared(prepared_path[p], geometry) for p in batch]
            fixed, moving = (torch.as_tensor(np.stack([p[key] for p in pairs]))[:, None] for key in ("fixed", "moving"))
            t0 = time.perf_counter()
            result = agent.run(fixed, moving, agent_settings)
            synchronize(device)
            seconds = (time.perf_counter() - t0) / len(batch)
            u = result.displacement.double().cpu()
            for i, ((m, f), pair) in enumerate(zip(batch, pairs, strict=True)):
                figs = figures(warp_label(pair["moving_label"], u[i]), pair["fixed_label"], u[i].numpy())
                if fixed_space_of is not None:
                    figs.update(fixed_space_of(m, f, method, pair, bundle.sdm.deformation(result.theta[i]),
                                               geometry.control_grid()))
                store(m, f, method, {**figs, "seconds": seconds},
                      {"batch_size": len(batch), "device": str(device), "steps": int(result.steps_taken[i])})
            done += len(batch)
            progress("agent", done, len(todo))


def gt_settings(iterations: int | None, bundle: ModelBundle | None) -> dict[str, int]:
    """The gt reference's elastix ``iterations`` and ``resolutions``: ``iterations`` when given, else those of the
    model's ground truth (recorded in the model), else ``agentreg groundtruth``'s defaults."""
    recorded = bundle.groundtruth_settings if bundle is not None else {}
    return {"gt_iterations": iterations or recorded.get("iterations", GT_ITERATIONS),
            "gt_resolutions": recorded.get("resolutions", GT_RESOLUTIONS)}


def model_to_evaluate(model: str | Path | None, dim: int, crop: str | None, methods: list[str],
                      ) -> tuple[Path | None, ModelBundle | None]:
    """The model of ours / nfc (``model``, default the shipped one of ``dim``; none when no method needs one and none
    is given) and its bundle, checked against ``dim`` and ``crop``."""
    if not (any(m in AGENT_METHODS for m in methods) or model):
        return None, None
    model = Path(model or shipped_model(dim))
    if not model.is_file():
        raise FileNotFoundError(f"model bundle not found: {model}. {how_to_get_a_model(dim)}")
    bundle = load_bundle(model)
    if bundle.dim != dim:
        raise ValueError(f"{model} is a {bundle.dim}-D model but --dim is {dim}: use --dim {bundle.dim} "
                         f"or a {dim}-D model")
    model_crop = "organ" if bundle.geometry.localised else "paper"
    if crop and crop != model_crop:
        raise ValueError(f"--crop {crop}: {model} was trained on {model_crop} crops; leave --crop out to use the model's")
    return model, bundle


