"""Registration of a cohort: many pairs with one model load (``agentreg register-many``).

A cohort is a list of pairs: the rows of a CSV of pairs, or one atlas (image and label) against a folder of
patients, the patients being the fixed images (the atlas label is propagated onto each). Every pair is
checked and prepared exactly as ``agentreg register`` does it (:mod:`.inputs`, :meth:`.Registrar.prepare`),
in ``workers`` processes when more than one; the agent runs on batches of prepared pairs on the device, pairs
of different fixed images in one batch (:meth:`.Registrar.run_agent`: a pair's result does not depend on its
batch); and each pair's results are written into its own folder exactly as ``agentreg register`` writes
them (:func:`.outputs.write_registration_outputs`). ``summary.csv`` beside the pair folders has one row per
pair (:data:`SUMMARY_COLUMNS`).

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
import multiprocessing
import re
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .files import atomic_write
from .protocol import (
    DISPLACEMENT,
    METRICS_JSON,
    STEPS_DIR,
    TRAJECTORY_CSV,
    TRAJECTORY_PNG,
    WARPED,
    WARPED_LABEL,
    read_metrics,
)

SUMMARY_CSV = "summary.csv"
COHORT_JSON = "cohort.json"
SUMMARY_COLUMNS = ("pair", "status", "fixed", "moving", "dice_before", "dice_after", "hausdorff_before",
                   "hausdorff_after", "steps", "seconds", "warnings", "message")
"""Columns of summary.csv: Dice and Hausdorff distance (fixed image's physical units) at the agent's start and
after it, where both labels exist (as in metrics.json); ``seconds`` the pair's share of the run; ``warnings``
what was accepted on purpose (e.g. a resampled label), separated by `` | ``; ``message`` why a pair failed."""
REGISTERED, SKIPPED, FAILED = "registered", "skipped", "failed"
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


@dataclass
class CohortOptions:
    """How a cohort runs; ``model`` is the bundle's file (each worker process loads it)."""

    model: Path
    batch_size: int = 16
    workers: int = 1
    threads: int = 1
    resample_labels: bool = False
    save_steps: int = 0

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
        return {"pair": self.pair.name, "status": self.status, "fixed": str(self.pair.fixed),
                "moving": str(self.pair.moving), "dice_before": number("dice_before", ".4f"),
                "dice_after": number("dice_after", ".4f"), "hausdorff_before": number("hausdorff_before", ".4g"),
                "hausdorff_after": number("hausdorff_after", ".4g"), "steps": number("steps", "d"),
                "seconds": "" if self.seconds is None else f"{self.seconds:.2f}",
                "warnings": " | ".join(self.warnings), "message": self.message}


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
        if not pair.name or pair.name in (".", "..") or pair.name.startswith(".") or re.search(r"[/\\]", pair.name):
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


def parse_point(text: str, what: str = "fixed_point") -> tuple[float, ...] | None:
    """A physical point written as numbers separated by commas, semicolons or spaces (``None`` when empty)."""
    if not text or not text.strip():
        return None
    try:
        return tuple(float(v) for v in re.split(r"[,; ]+", text.strip()))
    except ValueError:
        raise ValueError(f"{what} {text!r}: give the point as numbers separated by commas, e.g. 12.5,-30,4") from None


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
    atlas = Path(atlas)
    for what, path in (("atlas image", atlas), ("atlas label", atlas_label)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
    pairs = [CohortPair(name, image, atlas, label, Path(atlas_label) if atlas_label else None)
             for name, image, label in patient_images(patients) if image.resolve() != atlas.resolve()]
    return _check_names(pairs, str(patients))


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
        with path.open(newline="") as f:
            return {row["pair"]: row for row in csv.DictReader(f) if row.get("pair")}
    except (OSError, KeyError, csv.Error):
        return {}


def write_summary(path: Path, reports: list[PairReport]) -> Path:
    """summary.csv, one row per reported pair."""
    text = io.StringIO()
    writer = csv.DictWriter(text, SUMMARY_COLUMNS, lineterminator="\n")
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
    """A pair read, checked and on the model grid, waiting for the agent."""

    pair: CohortPair
    given: object  # inputs.RegisterInputs: the checked images
    prepared: object  # preprocessing.PreparedPair
    seconds: float


def _message(err: BaseException) -> str:
    """A failure in a sentence: a user's error as it reads, anything else with its kind."""
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, (ValueError, OSError, RuntimeError)) else f"{type(err).__name__}: {text}"


class CohortWorker:
    """Reads and prepares pairs and writes their results, in the main process or in a worker process."""

    def __init__(self, registrar, settings, options: CohortOptions, output_dir: Path):
        self.registrar = registrar
        self.settings = settings
        self.options = options
        self.output_dir = Path(output_dir)

    def prepare(self, pair: CohortPair) -> PreparedCohortPair | PairReport:
        """As ``agentreg register``: read and check the files, then localise (or pre-align) and crop."""
        from .inputs import check_model_dimension, read_register_inputs

        start = time.perf_counter()
        try:
            given = read_register_inputs(pair.fixed, pair.moving, pair.fixed_label, pair.moving_label,
                                         self.options.resample_labels)
            check_model_dimension(self.registrar.bundle.dim, given.fixed.GetDimension(), self.options.model, pair.fixed)
            point = None if pair.fixed_point is None else np.array(pair.fixed_point)
            prepared = self.registrar.prepare(given.fixed, given.moving, given.fixed_label, given.moving_label,
                                              fixed_point=point)
        except Exception as err:  # noqa: BLE001 - any failure of one pair is reported, the others go on
            return PairReport(pair, FAILED, seconds=time.perf_counter() - start, message=_message(err))
        return PreparedCohortPair(pair, given, prepared, time.perf_counter() - start)

    def finish(self, item: PreparedCohortPair, outcome, agent_seconds: float, batch: int) -> PairReport:
        """The agent's result in the fixed image's geometry, written into the pair's folder."""
        from .outputs import write_registration_outputs

        start = time.perf_counter()
        given, pair = item.given, item.pair
        try:
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
                              warnings=list(given.notes))
        seconds = item.seconds + agent_seconds / batch + time.perf_counter() - start
        return PairReport(pair, REGISTERED, result.metrics, seconds, list(given.notes))


_WORKER: CohortWorker | None = None  # the worker of a worker process


def _start_worker(settings, options: CohortOptions, output_dir: Path) -> None:
    import torch

    from .bundle import load_bundle
    from .registration import Registrar

    global _WORKER
    if options.threads:
        torch.set_num_threads(options.threads)
    _WORKER = CohortWorker(Registrar(load_bundle(options.model), torch.device("cpu"), agent=False), settings, options,
                           output_dir)


def _prepare_job(pair: CohortPair):
    return _WORKER.prepare(pair)


def _finish_job(item: PreparedCohortPair, outcome, agent_seconds: float, batch: int) -> PairReport:
    return _WORKER.finish(item, outcome, agent_seconds, batch)


class _InlineExecutor:
    """Runs each job at once in this process (``workers`` = 1)."""

    def __init__(self, worker: CohortWorker):
        self.worker = worker

    def submit(self, job, *args) -> Future:
        method = {_prepare_job: self.worker.prepare, _finish_job: self.worker.finish}[job]
        future = Future()
        try:
            future.set_result(method(*args))
        except Exception as err:  # noqa: BLE001 - as a process pool hands it back
            future.set_exception(err)
        return future

    def shutdown(self, **_) -> None:
        pass


# ----------------------------------------------------------------------------------------- the run
def register_cohort(pairs: list[CohortPair], bundle, output_dir: str | Path, settings, device,
                    options: CohortOptions,
                    progress: Callable[[int, int, PairReport | None], None] | None = None) -> list[PairReport]:
    """Register every pair of a cohort with the loaded ``bundle`` (from ``options.model``) on ``device``; returns
    one report per pair, in the order of ``pairs``, and writes them to ``output_dir``/summary.csv as they come.

    ``progress(done, total, report)`` after each pair (``report`` ``None`` for the pairs skipped at the start).
    Raises ``ValueError`` only for what stops the whole run (a folder of another model, a bad option)."""
    from .registration import Registrar

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_record(output_dir, run_record(options.model, settings, options))
    summary_path = output_dir / SUMMARY_CSV
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
    if not todo:
        write_summary(summary_path, [reports[p.name] for p in pairs])
        return [reports[p.name] for p in pairs]
    registrar = Registrar(bundle, device)
    if options.workers > 1:
        executor = ProcessPoolExecutor(max_workers=min(options.workers, len(todo)),
                                       mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                       initargs=(settings, options, output_dir))
        held = 2 * options.batch_size  # prepared pairs (images in memory) at most, counting those in preparation
    else:
        executor = _InlineExecutor(CohortWorker(registrar, settings, options, output_dir))
        held = options.batch_size
    queue = list(reversed(todo))
    preparing: dict[Future, CohortPair] = {}
    finishing: dict[Future, CohortPair] = {}
    ready: list[PreparedCohortPair] = []
    try:
        while queue or preparing or ready or finishing:
            while queue and len(preparing) + len(ready) < held:
                pair = queue.pop()
                preparing[executor.submit(_prepare_job, pair)] = pair
            if ready and (len(ready) >= options.batch_size or not (queue or preparing)):
                batch, ready = ready[: options.batch_size], ready[options.batch_size:]
                start = time.perf_counter()
                try:
                    outcomes = registrar.run_agent([item.prepared for item in batch], settings)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory on the device: this batch fails
                    for item in batch:
                        record(PairReport(item.pair, FAILED, seconds=item.seconds, warnings=list(item.given.notes),
                                          message=f"the agent failed on its batch of {len(batch)} pairs: "
                                                  f"{_message(err)}"))
                    continue
                seconds = time.perf_counter() - start
                for item, outcome in zip(batch, outcomes, strict=True):
                    finishing[executor.submit(_finish_job, item, outcome, seconds, len(batch))] = item.pair
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
    return [reports[p.name] for p in pairs]


def summary_text(reports: list[PairReport]) -> str:
    """One line on a run: how many pairs were registered, skipped and failed, and the Dice after."""
    count = {s: sum(r.status == s for r in reports) for s in (REGISTERED, SKIPPED, FAILED)}
    dice = [r.metrics["dice_after"] for r in reports if r.status != FAILED and "dice_after" in r.metrics]
    text = (f"{len(reports)} pairs: {count[REGISTERED]} registered, {count[SKIPPED]} skipped (done before), "
            f"{count[FAILED]} failed")
    if dice:
        before = [r.metrics["dice_before"] for r in reports if r.status != FAILED and "dice_after" in r.metrics]
        text += (f"; Dice median {np.median(before):.3f} -> {np.median(dice):.3f} "
                 f"(mean {np.mean(before):.3f} -> {np.mean(dice):.3f}) on the {len(dice)} pairs with both labels")
    return text
