"""Registration of a cohort: many pairs with one model load (``agentreg register-many``).

A cohort is a list of pairs: the rows of a CSV of pairs, or one or several atlases (image and label) against a
folder of patients, the patients being the fixed images (each atlas label is propagated onto each). Every pair
is checked and prepared exactly as ``agentreg register`` does it (:mod:`.inputs`, :meth:`.Registrar.prepare`)
by the workers (this process; ``workers`` local processes; or the workers of a Dask scheduler); the agent runs
here on batches of prepared pairs on the device, pairs of different fixed images in one batch
(:meth:`.Registrar.run_agent`: a pair's result does not depend on its batch); and the workers write each pair's
results into its own folder exactly as ``agentreg register`` writes them
(:func:`.outputs.write_registration_outputs`). A worker reads an atlas once, not once per pair. ``summary.csv``
beside the pair folders has one row per pair (:data:`.register_folder.COHORT_SUMMARY_COLUMNS`).

- Several atlases: the folder of patient P holds one folder per atlas (``P/<atlas>``, the pair's files) and
  ``P/fused_label.nii.gz``, the majority vote of the atlases' warped labels (:func:`.majority_vote`: a tie goes
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

This module is the run (:func:`register_cohort`: what is done already, the batches, the summary); the pairs are
:mod:`.cohort_pairs`', the work of one pair in a worker :mod:`.cohort_worker`'s, the reports, summary.csv and the
fusion :mod:`.cohort_results`'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, replace
from pathlib import Path

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.register_folder import (
    COHORT_JSON,
    COHORT_SUMMARY_CSV,
    DISPLACEMENT,
    METRICS_JSON,
    QA_PNG,
    STEPS_DIR,
    TRAJECTORY_CSV,
    TRAJECTORY_PNG,
    WARPED,
    WARPED_LABEL,
    read_metrics,
)
from AgentRegistrationLib.stages.cohort_pairs import CohortPair
from AgentRegistrationLib.stages.cohort_results import (
    FAILED,
    SKIPPED,
    PairReport,
    failure_message,
    fuse_patients,
    read_summary,
    write_summary,
)
from AgentRegistrationLib.stages.cohort_worker import (
    CohortOptions,
    CohortWorker,
    InlineExecutor,
    PreparedCohortPair,
    WorkerContext,
    finish_job,
    make_executor,
    prepare_job,
)


def output_files(pair: CohortPair, save_steps: int = 0) -> list[str]:
    """The files (and folder) a complete output folder of ``pair`` holds."""
    names = [WARPED, DISPLACEMENT, TRAJECTORY_CSV, TRAJECTORY_PNG, QA_PNG, METRICS_JSON]
    return names + ([WARPED_LABEL] if pair.moving_label else []) + ([STEPS_DIR] if save_steps > 0 else [])


def finished_metrics(folder: Path, pair: CohortPair, save_steps: int = 0) -> dict | None:
    """The metrics of ``pair``'s output folder when it is complete, else ``None``."""
    if not all((folder / name).exists() for name in output_files(pair, save_steps)):
        return None
    try:
        return read_metrics(folder / METRICS_JSON)
    except (ValueError, OSError):
        return None


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
    inline = isinstance(executor, InlineExecutor)
    held = options.batch_size if inline else 2 * options.batch_size  # prepared pairs at most, with those in hand
    queue = list(reversed(todo))
    preparing: dict[Future, CohortPair] = {}
    finishing: dict[Future, CohortPair] = {}
    ready: list[PreparedCohortPair] = []
    try:
        while queue or preparing or ready or finishing:
            while queue and len(preparing) + len(ready) < held:
                pair = queue.pop()
                preparing[executor.submit(prepare_job, context, pair)] = pair
            if ready and (len(ready) >= options.batch_size or not (queue or preparing)):
                batch, ready = ready[: options.batch_size], ready[options.batch_size:]
                start = time.perf_counter()
                try:
                    outcomes = registrar.run_agent([item.prepared for item in batch], settings)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory on the device: this batch fails
                    for item in batch:
                        record(PairReport(item.pair, FAILED, seconds=item.seconds, warnings=list(item.notes),
                                          message=f"the agent failed on its batch of {len(batch)} pairs: "
                                                  f"{failure_message(err)}"))
                    continue
                seconds = time.perf_counter() - start
                for item, outcome in zip(batch, outcomes, strict=True):
                    finishing[executor.submit(finish_job, context, item, outcome, seconds, len(batch))] = item.pair
                continue
            done, _ = wait([*preparing, *finishing], return_when=FIRST_COMPLETED)
            for future in [f for f in [*preparing, *finishing] if f in done]:  # in the order they were given
                pair = preparing.pop(future, None) or finishing.pop(future)
                try:
                    outcome = future.result()
                except Exception as err:  # noqa: BLE001 - a worker process that died or could not send its result
                    outcome = PairReport(pair, FAILED, message=f"the worker process failed: {failure_message(err)}")
                if isinstance(outcome, PairReport):
                    record(outcome)
                else:
                    ready.append(outcome)
    finally:
        executor.shutdown(cancel_futures=True)
