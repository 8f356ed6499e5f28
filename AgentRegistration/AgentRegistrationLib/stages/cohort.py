"""Registration of a cohort: many pairs with one model load (``agentreg register-many``).

A cohort is a list of pairs: the rows of a CSV of pairs, or one or several atlases (image and label) against a
folder of patients, the patients being the fixed images (each atlas label is propagated onto each). Every pair
is checked and prepared exactly as ``agentreg register`` does it (:mod:`.inputs`, :meth:`.Registrar.prepare`)
by the workers (this process; ``workers`` local processes; or the workers of a Dask scheduler); the agent runs
here on batches of prepared pairs on the device, pairs of different fixed images in one batch
(:meth:`.Registrar.run_agent`: a pair's result does not depend on its batch); and the workers write each pair's
results into its own folder exactly as ``agentreg register`` writes them
(:func:`.outputs.write_registration_outputs`). A worker reads an atlas once, not once per pair. ``summary.csv``
beside the pair folders has one row per pair (:data:`COHORT_SUMMARY_COLUMNS`).

- Several atlases: the folder of patient P holds one folder per atlas (``P/<atlas>``, the pair's files) and
  ``P/fused_label.nii.gz``, the majority vote of the atlases' warped labels (:func:`majority_vote`: a tie goes
  to the lowest label, the background when it is tied); summary.csv has a row ``P/fused`` (status ``fused``)
  after the pairs, with the fused label's Dice and Hausdorff distance where P has a label.

- A pair that fails (an unreadable image, an empty label, images that do not overlap, ...) gets status
  ``failed`` and its message in the summary; the others go on.
- Resuming: a pair whose folder holds every output file is not registered again (status ``skipped``, its
  numbers read back from its metrics.json). ``cohort.json`` records the model and the settings that change
  results; a rerun into the same folder with others is refused, so one folder never mixes two models.
- Seconds: in metrics.json ``seconds_preprocessing`` and ``seconds_outputs`` are the pair's own,
  ``seconds_agent`` its batch's (``pairs_in_batch`` pairs) and ``seconds_total`` their sum; the summary's
  ``seconds`` is the pair's share: its own work plus its batch's agent time divided by the batch's pairs.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.points import parse_point
from AgentRegistrationLib.contract.register_folder import (
    COHORT_DONE,
    COHORT_JSON,
    COHORT_SUMMARY_COLUMNS,
    COHORT_SUMMARY_CSV,
    DISPLACEMENT,
    METRICS_JSON,
    METRICS_PER_LABEL_KEY,
    STEPS_DIR,
    TRAJECTORY_CSV,
    TRAJECTORY_PNG,
    WARPED,
    WARPED_LABEL,
    read_cohort_summary,
    read_metrics,
)

(REGISTERED, SKIPPED), FAILED = COHORT_DONE, "failed"
"""A pair's status: registered in this run, skipped (its folder was complete from an earlier run), failed."""
CSV_COLUMNS = ("fixed", "moving", "fixed_label", "moving_label", "fixed_point", "name")
"""Columns of a CSV of pairs: ``fixed`` and ``moving`` are required; a relative path is relative to the CSV."""
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File names a patient folder's images and labels may end with."""
LABEL_SUFFIX = "_label"


@dataclass(frozen=True)
class CohortPair:
    """One pair of a cohort; ``name`` is its output folder's name."""

    name: str
    fixed: Path
    moving: Path
    fixed_label: Path | None = None
    moving_label: Path | None = None
    fixed_point: tuple[float, ...] | None = None  # the organ's centre in the fixed image (physical LPS)
    patient: str | None = None  # with several atlases: the patient whose atlas results are fused


@dataclass
class CohortOptions:
    """How a cohort runs; ``model`` is the bundle's file (each worker process loads it)."""

    model: Path
    batch_size: int = 16
    workers: int = 1
    threads: int = 1
    resample_labels: bool = False
    save_steps: int = 0
    scheduler: str | None = None  # a Dask distributed scheduler's address: its workers prepare and write the pairs

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: give 1 or more pairs per agent batch")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: give 1 or more processes (0: one per core)")
        if self.threads < 0:
            raise ValueError(f"--threads {self.threads}: give a positive number of CPU threads, or 0 for torch's choice")
        if self.save_steps < 0:
            raise ValueError(f"--save-steps {self.save_steps}: give K > 0 to write the warped image every K steps, or 0")


@dataclass
class PairReport:
    """What became of one pair: a row of summary.csv."""

    pair: CohortPair
    status: str
    metrics: dict = field(default_factory=dict)
    seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    message: str = ""

    def row(self) -> dict[str, str]:
        m = self.metrics
        number = lambda key, fmt: format(m[key], fmt) if m.get(key) is not None else ""  # noqa: E731
        per_label = {key: number(key, ".4f" if key.startswith("dice") else ".4g") for key in m
                     if (found := METRICS_PER_LABEL_KEY.match(key)) and found.group(2) != "none"}
        return {"pair": self.pair.name, "status": self.status, "fixed": str(self.pair.fixed),
                "moving": str(self.pair.moving), "dice_before": number("dice_before", ".4f"),
                "dice_after": number("dice_after", ".4f"), "hausdorff_before": number("hausdorff_before", ".4g"),
                "hausdorff_after": number("hausdorff_after", ".4g"), **per_label, "steps": number("steps", "d"),
                "seconds": "" if self.seconds is None else f"{self.seconds:.2f}",
                "warnings": " | ".join(self.warnings), "message": self.message}


def summary_columns(reports: list[PairReport]) -> list[str]:
    """The columns of summary.csv for ``reports``: :data:`COHORT_SUMMARY_COLUMNS`, with, after ``hausdorff_after``, the
    Dice and Hausdorff distance before and after of each label value alone (``dice_after_label_<n>``, ...; the keys
    of metrics.json) when some pair's labels hold several values."""
    values = sorted({int(found.group(3)) for r in reports for key in r.metrics
                     if (found := METRICS_PER_LABEL_KEY.match(key)) and found.group(2) != "none"})
    per_label = [f"{metric}_{when}_label_{v}" for v in values for metric in ("dice", "hausdorff")
                 for when in ("before", "after")]
    at = COHORT_SUMMARY_COLUMNS.index("hausdorff_after") + 1
    return [*COHORT_SUMMARY_COLUMNS[:at], *per_label, *COHORT_SUMMARY_COLUMNS[at:]]


# ----------------------------------------------------------------------------------------- the pairs
def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0]


def _check_names(pairs: list[CohortPair], source: str) -> list[CohortPair]:
    seen: dict[str, CohortPair] = {}
    for pair in pairs:
        parts = pair.name.split("/") if pair.patient is not None else [pair.name]  # <patient>/<atlas>: two folders
        if any(not part or part.startswith(".") or re.search(r"[/\\]", part) for part in parts):
            raise ValueError(f"{source}: pair name {pair.name!r} cannot be a folder name: give a name without '/' "
                             "that does not start with '.'")
        if pair.name in seen:
            raise ValueError(f"{source}: two pairs would write to the same folder {pair.name!r} ({seen[pair.name].moving}"
                             f" to {seen[pair.name].fixed}, and {pair.moving} to {pair.fixed}): give each pair its own "
                             "name (a 'name' column in a CSV of pairs)")
        seen[pair.name] = pair
    if not pairs:
        raise ValueError(f"{source}: no pair to register")
    return pairs


def pairs_from_csv(path: str | Path) -> list[CohortPair]:
    """The pairs of a CSV with columns ``fixed``, ``moving`` and optionally ``fixed_label``, ``moving_label``,
    ``fixed_point`` and ``name`` (the output folder; default ``<moving>_to_<fixed>`` from the file names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV of pairs not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("fixed", "moving") if c not in columns]
        unknown = [c for c in columns if c not in CSV_COLUMNS]
        if missing or unknown:
            raise ValueError(f"{path}: " + (f"missing column(s) {', '.join(missing)}" if missing else
                                            f"unknown column(s) {', '.join(unknown)}")
                             + f"; the columns are {', '.join(CSV_COLUMNS[:2])} and optionally "
                               f"{', '.join(CSV_COLUMNS[2:])}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]

    def file(row: dict, key: str, line: int) -> Path | None:
        if not row.get(key):
            if key in ("fixed", "moving"):
                raise ValueError(f"{path}, line {line}: the {key} image is empty")
            return None
        value = Path(row[key]).expanduser()
        return value if value.is_absolute() else path.parent / value

    pairs = []
    for line, row in enumerate(rows, 2):
        fixed, moving = file(row, "fixed", line), file(row, "moving", line)
        pairs.append(CohortPair(row.get("name") or f"{_stem(moving)}_to_{_stem(fixed)}", fixed, moving,
                                file(row, "fixed_label", line), file(row, "moving_label", line),
                                parse_point(row.get("fixed_point", ""), f"{path}, line {line}: fixed_point")))
    return _check_names(pairs, str(path))


def patient_images(folder: str | Path) -> list[tuple[str, Path, Path | None]]:
    """``(name, image, label or None)`` of each image in ``folder``: ``<name>.<ext>`` or ``<name>_image.<ext>``,
    its label ``<name>_label.<ext>`` when present (:data:`IMAGE_SUFFIXES`; other files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"patient folder not found: {folder} (give a folder of images, each with an "
                                f"optional <name>{LABEL_SUFFIX} file beside it)")
    images, labels = {}, {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not path.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        stem = _stem(path)
        if stem.endswith(LABEL_SUFFIX):
            labels.setdefault(stem[: -len(LABEL_SUFFIX)], path)
            continue
        name = stem[: -len("_image")] if stem.endswith("_image") else stem
        if name in images:
            raise ValueError(f"{folder}: two images of patient {name!r} ({images[name].name} and {path.name}): keep one")
        images[name] = path
    if not images:
        raise ValueError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)} files other than *{LABEL_SUFFIX}.*)")
    return [(name, image, labels.get(name)) for name, image in images.items()]


def atlas_pairs(atlas: str | Path, atlas_label: str | Path | None, patients: str | Path) -> list[CohortPair]:
    """One pair per patient image of the folder ``patients`` (the fixed image, with its label when present),
    the atlas being the moving image; each pair is named after its patient. The atlas itself is left out if it
    is in the folder."""
    return multi_atlas_pairs([(atlas, atlas_label)], patients)


def multi_atlas_pairs(atlases: list[tuple[str | Path, str | Path | None]], patients: str | Path) -> list[CohortPair]:
    """The pairs of several atlases ``(image, label)`` against the folder ``patients``: every atlas onto every
    patient image (the fixed image). One atlas: pairs named after the patient (``<patient>``). Several: each
    must have a label; pairs ``<patient>/<atlas>`` (the atlas named by its image file), patient by patient, so
    that :func:`fuse_patients` can vote on the atlases' labels. An atlas image that is in the folder is no
    patient."""
    atlases = [(Path(image), Path(label) if label else None) for image, label in atlases]
    if not atlases:
        raise ValueError("give at least one atlas (--atlas IMAGE --atlas-label LABEL)")
    for image, label in atlases:
        for what, path in (("atlas image", image), ("atlas label", label)):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{what} file not found: {path}")
    names = [_stem(image) for image, _ in atlases]
    if len(atlases) > 1:
        unlabelled = [str(image) for image, label in atlases if label is None]
        if unlabelled:
            raise ValueError(f"atlas {unlabelled[0]} has no label: with several atlases each needs its --atlas-label "
                             "(in the order of the --atlas images), for the majority vote of their labels")
        twice = sorted({n for n in names if names.count(n) > 1 or n == FUSED})
        if twice:
            raise ValueError(f"two atlases have the same file name {twice[0]!r} (or one is named {FUSED!r}, the "
                             "name of the fused label's row): their results would share a folder; rename one")
    own = {image.resolve() for image, _ in atlases}
    pairs = []
    for patient, image, label in patient_images(patients):
        if image.resolve() in own:
            continue
        for name, (atlas, atlas_label) in zip(names, atlases, strict=True):
            pairs.append(CohortPair(patient if len(atlases) == 1 else f"{patient}/{name}", image, atlas, label,
                                    atlas_label, patient=patient if len(atlases) > 1 else None))
    return _check_names(pairs, str(patients))


# ----------------------------------------------------------------------------------------- fusion
FUSED_LABEL = "fused_label.nii.gz"
FUSED = "fused"
"""The status of a patient's fused row in summary.csv (pair ``<patient>/fused``)."""


def majority_vote(labels: list[np.ndarray]) -> np.ndarray:
    """The label each voxel gets from most of ``labels`` (arrays of one shape, integer label values; background 0
    counts as a label). A tie goes to the lowest of the tied labels: to the background when it is among them, so
    with two atlases a voxel is foreground only where both say so."""
    stack = np.stack([np.asarray(a) for a in labels])
    values = np.unique(stack)  # ascending: on a tie argmax keeps the first, i.e. the lowest label
    counts = np.stack([(stack == v).sum(axis=0) for v in values])
    return values[np.argmax(counts, axis=0)].astype(stack.dtype)


def fuse_patients(pairs: list[CohortPair], reports: list[PairReport], output_dir: Path) -> list[PairReport]:
    """For each patient of several atlases: the majority vote (:func:`majority_vote`) of the labels its atlases
    were warped into (their ``warped_label.nii.gz``), written to ``<patient>/fused_label.nii.gz``, and a report
    (status ``fused``; Dice and Hausdorff distance against the patient's label where it has one). Atlases whose
    pair failed are left out of the vote, with a warning; a patient with none left is ``failed``."""
    import SimpleITK as sitk

    from AgentRegistrationLib.core.metrics import dice, per_label, surface_distances
    from AgentRegistrationLib.data.image_io import read_label, write_image

    by_patient: dict[str, list[PairReport]] = {}
    for pair, report in zip(pairs, reports, strict=True):
        if pair.patient is not None:
            by_patient.setdefault(pair.patient, []).append(report)
    fused = []
    for patient, group in by_patient.items():
        first = group[0].pair
        pair = CohortPair(f"{patient}/{FUSED}", first.fixed, Path(f"majority vote of {len(group)} atlases"),
                          first.fixed_label, patient=patient)
        start = time.perf_counter()
        done = [r for r in group if r.status != FAILED]
        warnings = [f"{r.pair.name} failed: left out of the vote" for r in group if r.status == FAILED]
        if not done:
            fused.append(PairReport(pair, FAILED, message="every atlas failed on this patient", warnings=warnings))
            continue
        try:
            labels = [read_label(output_dir / r.pair.name / WARPED_LABEL, "warped atlas label") for r in done]
            vote = sitk.GetImageFromArray(majority_vote([sitk.GetArrayFromImage(label) for label in labels]))
            vote.CopyInformation(labels[0])
            write_image(vote, output_dir / patient / FUSED_LABEL)
            metrics = {"atlases": len(done)}
            if first.fixed_label is not None:
                truth = sitk.GetArrayFromImage(read_label(first.fixed_label, "patient label"))
                voted = sitk.GetArrayFromImage(vote)
                metrics["dice_after"] = dice(voted, truth)
                if voted.any() and truth.any():
                    metrics["hausdorff_after"] = surface_distances(voted > 0, truth > 0,
                                                                   vote.GetSpacing())["hausdorff"]
                for value, figures in per_label(voted, truth, vote.GetSpacing()).items():
                    metrics.update({f"{key}_after_label_{value}": v for key, v in figures.items()})
        except Exception as err:  # noqa: BLE001 - one patient's fusion failing stops no other
            fused.append(PairReport(pair, FAILED, seconds=time.perf_counter() - start, message=_message(err),
                                    warnings=warnings))
            continue
        fused.append(PairReport(pair, FUSED, metrics, time.perf_counter() - start, warnings))
    return fused


# ----------------------------------------------------------------------------------------- folders and files
def output_files(pair: CohortPair, save_steps: int = 0) -> list[str]:
    """The files (and folder) a complete output folder of ``pair`` holds."""
    names = [WARPED, DISPLACEMENT, TRAJECTORY_CSV, TRAJECTORY_PNG, METRICS_JSON]
    return names + ([WARPED_LABEL] if pair.moving_label else []) + ([STEPS_DIR] if save_steps > 0 else [])


def finished_metrics(folder: Path, pair: CohortPair, save_steps: int = 0) -> dict | None:
    """The metrics of ``pair``'s output folder when it is complete, else ``None``."""
    if not all((folder / name).exists() for name in output_files(pair, save_steps)):
        return None
    try:
        return read_metrics(folder / METRICS_JSON)
    except (ValueError, OSError):
        return None


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier summary.csv by pair name (none when absent or unreadable)."""
    try:
        return {row["pair"]: row for row in read_cohort_summary(path) if row.get("pair")}
    except ValueError:
        return {}


def write_summary(path: Path, reports: list[PairReport]) -> Path:
    """summary.csv, one row per reported pair."""
    text = io.StringIO()
    writer = csv.DictWriter(text, summary_columns(reports), lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.row() for r in reports)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


def check_record(output_dir: Path, record: dict) -> None:
    """Write ``cohort.json`` (the model and settings of the run), or refuse a run with others in a folder that
    already has one."""
    path = output_dir / COHORT_JSON
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if earlier is not None and earlier != record:
            changed = sorted(k for k in set(record) | set(earlier) if record.get(k) != earlier.get(k))
            raise ValueError(f"{output_dir} holds results of another model or other settings ({', '.join(changed)} "
                             f"differ from its {COHORT_JSON}): give another --output-dir, or delete that folder to "
                             "start again")
        if earlier is not None:
            return
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def run_record(model: Path, settings, options: CohortOptions) -> dict:
    """What decides a cohort's results: the model file (by hash), the agent's settings, and the options that
    change the output files."""
    import hashlib

    return {"model_sha256": hashlib.sha256(Path(model).read_bytes()).hexdigest()[:16],
            "agent": asdict(settings), "resample_labels": options.resample_labels, "save_steps": options.save_steps}


# ----------------------------------------------------------------------------------------- the work of one pair
@dataclass
class PreparedCohortPair:
    """A pair read, checked and on the model grid, waiting for the agent. ``given`` (the checked images) stays in
    the process that read them: it is not sent to another process (:meth:`__getstate__`), whose worker reads the
    files again to finish the pair (:meth:`CohortWorker.finish`), which is cheaper than sending whole volumes twice
    through the agent's process."""

    pair: CohortPair
    prepared: object  # preprocessing.PreparedPair: the crops, small
    notes: list[str]
    seconds: float
    given: object = None  # inputs.RegisterInputs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "given": None}


def _message(err: BaseException) -> str:
    """A failure in a sentence: a user's error as it reads, anything else with its kind."""
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, (ValueError, OSError, RuntimeError)) else f"{type(err).__name__}: {text}"


class CohortWorker:
    """Reads and prepares pairs and writes their results, in the main process or in a worker process (a local
    process pool or a Dask worker). An atlas that is the moving image of many pairs is read and checked once per
    worker (``read_register_inputs``' ``moving_cache``)."""

    def __init__(self, registrar, settings, options: CohortOptions, output_dir: Path):
        self.registrar = registrar
        self.settings = settings
        self.options = options
        self.output_dir = Path(output_dir)
        self.moving_cache: dict = {}

    def read(self, pair: CohortPair):
        """The pair's checked images, as ``agentreg register`` reads them."""
        from AgentRegistrationLib.data.inputs import read_register_inputs

        return read_register_inputs(pair.fixed, pair.moving, pair.fixed_label, pair.moving_label,
                                    self.options.resample_labels, moving_cache=self.moving_cache)

    def prepare(self, pair: CohortPair) -> PreparedCohortPair | PairReport:
        """As ``agentreg register``: read and check the files, then localise (or pre-align) and crop."""
        from AgentRegistrationLib.data.inputs import check_model_dimension

        start = time.perf_counter()
        try:
            given = self.read(pair)
            check_model_dimension(self.registrar.bundle.dim, given.fixed.GetDimension(), self.options.model, pair.fixed)
            point = None if pair.fixed_point is None else np.array(pair.fixed_point)
            prepared = self.registrar.prepare(given.fixed, given.moving, given.fixed_label, given.moving_label,
                                              fixed_point=point)
        except Exception as err:  # noqa: BLE001 - any failure of one pair is reported, the others go on
            return PairReport(pair, FAILED, seconds=time.perf_counter() - start, message=_message(err))
        return PreparedCohortPair(pair, prepared, list(given.notes), time.perf_counter() - start, given)

    def finish(self, item: PreparedCohortPair, outcome, agent_seconds: float, batch: int) -> PairReport:
        """The agent's result in the fixed image's geometry, written into the pair's folder."""
        from AgentRegistrationLib.stages.outputs import write_registration_outputs

        start = time.perf_counter()
        pair = item.pair
        try:
            given = item.given if item.given is not None else self.read(pair)
            result = self.registrar.finish(item.prepared, outcome, given.fixed, given.moving, given.fixed_label,
                                           given.moving_label)
            outputs = time.perf_counter() - start
            result.metrics.update(seconds_total=item.seconds + agent_seconds + outputs,
                                  seconds_preprocessing=item.seconds, seconds_agent=agent_seconds,
                                  seconds_outputs=outputs, pairs_in_batch=batch)
            write_registration_outputs(result, self.output_dir / pair.name, given.moving, self.registrar.bundle.sdm,
                                       self.registrar.bundle.geometry, given.fixed, self.options.save_steps,
                                       title=f"{Path(pair.moving).name} to {Path(pair.fixed).name}",
                                       step_limit=self.settings.steps)
        except Exception as err:  # noqa: BLE001 - any failure of one pair is reported, the others go on
            return PairReport(pair, FAILED, seconds=item.seconds + time.perf_counter() - start, message=_message(err),
                              warnings=list(item.notes))
        seconds = item.seconds + agent_seconds / batch + time.perf_counter() - start
        return PairReport(pair, REGISTERED, result.metrics, seconds, list(item.notes))


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process needs to build its :class:`CohortWorker` (sent with every job: small)."""

    settings: object  # agent.AgentSettings
    options: CohortOptions
    output_dir: Path

    def key(self) -> str:
        return json.dumps([asdict(self.settings), asdict(self.options), str(self.output_dir)], default=str,
                          sort_keys=True)


_WORKERS: dict[str, CohortWorker] = {}  # the worker of this process (a pool's or a Dask worker's), by its context


def _worker(context: WorkerContext) -> CohortWorker:
    """This process's worker for ``context``, made on its first job (the model loaded once per process)."""
    key = context.key()
    if key not in _WORKERS:
        import torch

        from AgentRegistrationLib.model.bundle import load_bundle
        from AgentRegistrationLib.stages.registration import Registrar

        if context.options.threads:
            torch.set_num_threads(context.options.threads)
        _WORKERS.clear()  # one run at a time per process
        _WORKERS[key] = CohortWorker(Registrar(load_bundle(context.options.model), torch.device("cpu"), agent=False),
                                     context.settings, context.options, context.output_dir)
    return _WORKERS[key]


def _prepare_job(context: WorkerContext, pair: CohortPair):
    return _worker(context).prepare(pair)


def _finish_job(context: WorkerContext, item: PreparedCohortPair, outcome, agent_seconds: float,
                batch: int) -> PairReport:
    return _worker(context).finish(item, outcome, agent_seconds, batch)


class _InlineExecutor:
    """Runs each job at once in this process (``workers`` = 1), with the main process's worker."""

    def __init__(self, worker: CohortWorker):
        self.worker = worker

    def submit(self, job, context, *args) -> Future:
        method = {_prepare_job: self.worker.prepare, _finish_job: self.worker.finish}[job]
        future = Future()
        try:
            future.set_result(method(*args))
        except Exception as err:  # noqa: BLE001 - as a process pool hands it back
            future.set_exception(err)
        return future

    def shutdown(self, **_) -> None:
        pass


def make_executor(options: CohortOptions, jobs: int, main_worker: CohortWorker):
    """Where the jobs of one pair run: a Dask scheduler's workers (``options.scheduler``), local worker processes
    (``options.workers`` > 1) or this process (:mod:`.cluster`).

    Local workers of an agent on the CPU are forked from this process, which has imported torch and the engine
    but run nothing yet (the pool starts them all at its first job, before the first batch; torch's threads are
    set, none started): they start in a fraction of a second instead of importing torch again (seconds of CPU
    each, a third of a 12-pair run on 2 cores). With an agent on a GPU they are fresh interpreters (spawn): a
    CUDA context does not survive a fork."""
    if options.scheduler or options.workers > 1:
        from AgentRegistrationLib.stages.cluster import job_executor

        spawn = main_worker.registrar.device.type != "cpu"
        if not spawn and not options.scheduler:
            import matplotlib.backends.backend_agg  # noqa: F401 - the figure of every pair: imported once, inherited
            import matplotlib.figure  # noqa: F401
        return job_executor(min(options.workers, jobs), options.scheduler, spawn=spawn)
    return _InlineExecutor(main_worker)


# ----------------------------------------------------------------------------------------- the run
def register_cohort(pairs: list[CohortPair], bundle, output_dir: str | Path, settings, device,
                    options: CohortOptions,
                    progress: Callable[[int, int, PairReport | None], None] | None = None) -> list[PairReport]:
    """Register every pair of a cohort with the loaded ``bundle`` (from ``options.model``) on ``device``; returns
    one report per pair, in the order of ``pairs``, and writes them to ``output_dir``/summary.csv as they come.
    Pairs of one patient and several atlases (:func:`multi_atlas_pairs`) are fused at the end (:func:`fuse_patients`):
    their rows follow the pairs'.

    ``progress(done, total, report)`` after each pair (``report`` ``None`` for the pairs skipped at the start).
    Raises ``ValueError`` only for what stops the whole run (a folder of another model, a bad option)."""
    from AgentRegistrationLib.stages.registration import Registrar

    output_dir = Path(output_dir).resolve()
    options = replace(options, model=Path(options.model).resolve())
    output_dir.mkdir(parents=True, exist_ok=True)
    check_record(output_dir, run_record(options.model, settings, options))
    summary_path = output_dir / COHORT_SUMMARY_CSV
    earlier = read_summary(summary_path)
    reports: dict[str, PairReport] = {}
    todo = []
    for pair in pairs:
        metrics = finished_metrics(output_dir / pair.name, pair, options.save_steps)
        if metrics is None:
            todo.append(pair)
            continue
        row = earlier.get(pair.name, {})
        seconds = float(row["seconds"]) if row.get("seconds") else metrics.get("seconds_total")
        warnings = [w for w in row.get("warnings", "").split(" | ") if w]
        reports[pair.name] = PairReport(pair, SKIPPED, metrics, seconds, warnings)
    total = len(pairs)

    def record(report: PairReport) -> None:
        reports[report.pair.name] = report
        write_summary(summary_path, [reports[p.name] for p in pairs if p.name in reports])
        if progress is not None:
            progress(len(reports), total, report)

    if progress is not None:
        progress(len(reports), total, None)
    if todo:
        registrar = Registrar(bundle, device)
        context = WorkerContext(settings, options, output_dir)
        _run(todo, registrar, context, record)
    done = [reports[p.name] for p in pairs]
    fused = fuse_patients(pairs, done, output_dir)
    write_summary(summary_path, done + fused)
    return done + fused


def _run(todo: list[CohortPair], registrar, context: WorkerContext, record: Callable[[PairReport], None]) -> None:
    """The pipeline: pairs prepared by the executor, the agent on batches here, results written by the executor."""
    options, settings = context.options, context.settings
    executor = make_executor(options, len(todo), CohortWorker(registrar, settings, options, context.output_dir))
    inline = isinstance(executor, _InlineExecutor)
    held = options.batch_size if inline else 2 * options.batch_size  # prepared pairs at most, with those in hand
    queue = list(reversed(todo))
    preparing: dict[Future, CohortPair] = {}
    finishing: dict[Future, CohortPair] = {}
    ready: list[PreparedCohortPair] = []
    try:
        while queue or preparing or ready or finishing:
            while queue and len(preparing) + len(ready) < held:
                pair = queue.pop()
                preparing[executor.submit(_prepare_job, context, pair)] = pair
            if ready and (len(ready) >= options.batch_size or not (queue or preparing)):
                batch, ready = ready[: options.batch_size], ready[options.batch_size:]
                start = time.perf_counter()
                try:
                    outcomes = registrar.run_agent([item.prepared for item in batch], settings)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory on the device: this batch fails
                    for item in batch:
                        record(PairReport(item.pair, FAILED, seconds=item.seconds, warnings=list(item.notes),
                                          message=f"the agent failed on its batch of {len(batch)} pairs: "
                                                  f"{_message(err)}"))
                    continue
                seconds = time.perf_counter() - start
                for item, outcome in zip(batch, outcomes, strict=True):
                    finishing[executor.submit(_finish_job, context, item, outcome, seconds, len(batch))] = item.pair
                continue
            done, _ = wait([*preparing, *finishing], return_when=FIRST_COMPLETED)
            for future in [f for f in [*preparing, *finishing] if f in done]:  # in the order they were given
                pair = preparing.pop(future, None) or finishing.pop(future)
                try:
                    outcome = future.result()
                except Exception as err:  # noqa: BLE001 - a worker process that died or could not send its result
                    outcome = PairReport(pair, FAILED, message=f"the worker process failed: {_message(err)}")
                if isinstance(outcome, PairReport):
                    record(outcome)
                else:
                    ready.append(outcome)
    finally:
        executor.shutdown(cancel_futures=True)


def is_fusion(report: PairReport) -> bool:
    """Whether ``report`` is a patient's fused label (:func:`fuse_patients`), not a pair."""
    return report.pair.patient is not None and report.pair.name == f"{report.pair.patient}/{FUSED}"


def summary_text(reports: list[PairReport]) -> str:
    """One line on a run: how many pairs were registered, skipped and failed, and the Dice after (and of the fused
    labels, with several atlases)."""
    fusions = [r for r in reports if is_fusion(r)]
    reports = [r for r in reports if not is_fusion(r)]
    count = {s: sum(r.status == s for r in reports) for s in (REGISTERED, SKIPPED, FAILED)}
    dice = [r.metrics["dice_after"] for r in reports if r.status != FAILED and "dice_after" in r.metrics]
    text = (f"{len(reports)} pairs: {count[REGISTERED]} registered, {count[SKIPPED]} skipped (done before), "
            f"{count[FAILED]} failed")
    if dice:
        before = [r.metrics["dice_before"] for r in reports if r.status != FAILED and "dice_after" in r.metrics]
        text += (f"; Dice median {np.median(before):.3f} -> {np.median(dice):.3f} "
                 f"(mean {np.mean(before):.3f} -> {np.mean(dice):.3f}) on the {len(dice)} pairs with both labels")
        columns = [c for c in summary_columns(reports) if c.startswith("dice_after_label_")]
        text += "".join(f"; label {c.rsplit('_', 1)[1]} alone: median {np.median(v):.3f}" for c in columns
                        if (v := [r.metrics[c] for r in reports if r.status != FAILED and c in r.metrics]))
    if fusions:
        fused = [r.metrics["dice_after"] for r in fusions if "dice_after" in r.metrics]
        text += (f"; {sum(r.status == FUSED for r in fusions)} of {len(fusions)} patients fused (majority vote)"
                 + (f", Dice median {np.median(fused):.3f} on the {len(fused)} with a label" if fused else ""))
    return text
