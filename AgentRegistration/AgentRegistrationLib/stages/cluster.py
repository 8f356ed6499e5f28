"""Where the heavy per-pair jobs run: local worker processes, or the workers of a Dask distributed scheduler.

Ground truth (:func:`.groundtruth.run_groundtruth`) and batch registration (:mod:`.cohort`) hand their jobs to
:func:`job_executor`. Without a scheduler address the jobs run in a local process pool, as before; with one
(``--scheduler tcp://host:8786``: a ``dask.distributed`` scheduler, e.g. started by dask-jobqueue on an HPC
cluster) they run on its workers. Either way the futures are ``concurrent.futures`` futures, so the callers'
loops (``wait``, ``as_completed``) are the same.

A Dask worker must import this package (the same version) and read and write the job's files at the same paths
(a shared file system): jobs carry file names and small arrays, not volumes.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor


class DaskExecutor:
    """The workers of the Dask scheduler at ``address`` as an executor (``submit``, ``shutdown``, ``with``)."""

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:
            raise RuntimeError("--scheduler needs Dask's distributed package: pip install 'agentreg[distributed]' "
                               "(or 'dask[distributed]')") from None
        try:
            self.client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise OSError(f"cannot reach the Dask scheduler at {address}: {err} (is it running? give the address it "
                          "prints, e.g. tcp://host:8786)") from None
        self.executor = self.client.get_executor(pure=False)  # every job runs, even with equal arguments

    def submit(self, job, *args) -> Future:
        return self.executor.submit(job, *args)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        try:
            self.executor.shutdown(wait=wait and not cancel_futures)
        finally:
            self.client.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(cancel_futures=exc[0] is not None)


def job_executor(workers: int, scheduler: str | None = None, spawn: bool = False):
    """A Dask scheduler's workers when ``scheduler`` (an address) is given, else ``workers`` local processes
    (``spawn``: fresh interpreters, no copy of this process's torch state)."""
    if scheduler:
        return DaskExecutor(scheduler)
    context = multiprocessing.get_context("spawn") if spawn else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)
