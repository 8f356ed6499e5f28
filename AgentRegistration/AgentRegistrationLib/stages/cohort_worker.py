"""The work of one pair of a cohort, in the main process or in a worker process (a local process pool or a Dask
worker): read and prepare it as ``agentreg register`` does, and write its results once the agent has run
(:class:`CohortWorker`); where these jobs run (:func:`make_executor`)."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from AgentRegistrationLib.stages.cohort_pairs import CohortPair
from AgentRegistrationLib.stages.cohort_results import FAILED, REGISTERED, PairReport, failure_message


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
            return PairReport(pair, FAILED, seconds=time.perf_counter() - start, message=failure_message(err))
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
                                       step_limit=self.settings.steps, fixed_label=given.fixed_label)
        except Exception as err:  # noqa: BLE001 - any failure of one pair is reported, the others go on
            return PairReport(pair, FAILED, seconds=item.seconds + time.perf_counter() - start, message=failure_message(err),
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


def prepare_job(context: WorkerContext, pair: CohortPair):
    return _worker(context).prepare(pair)


def finish_job(context: WorkerContext, item: PreparedCohortPair, outcome, agent_seconds: float,
                batch: int) -> PairReport:
    return _worker(context).finish(item, outcome, agent_seconds, batch)


class InlineExecutor:
    """Runs each job at once in this process (``workers`` = 1), with the main process's worker."""

    def __init__(self, worker: CohortWorker):
        self.worker = worker

    def submit(self, job, context, *args) -> Future:
        method = {prepare_job: self.worker.prepare, finish_job: self.worker.finish}[job]
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
    return InlineExecutor(main_worker)
