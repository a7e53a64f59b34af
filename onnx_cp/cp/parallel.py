"""decompose_many(): many kernels in worker processes, with a progress bar.

Each job's result depends only on (kernel, rank, seed, options), never on the number of workers
or the order of completion, so workers=1 and workers=N give identical factors.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from onnx_cp.cp.decompose import check_args, decompose
from onnx_cp.cp.result import CPResult
from onnx_cp.errors import UsageError
from onnx_cp.progress import bar

# Total kernel size x rank below which decompose_many's default runs inline (about a second of
# solver time on one core; a worker process costs about that much to start).
INLINE_BELOW = 2_000_000
_BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_PR_SET_PDEATHSIG = 1


def _run_job(kernel: np.ndarray, rank: int, kwargs: dict) -> CPResult:
    return decompose(kernel, rank, **kwargs)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a killed caller (SIGKILL, a CI time-out) takes its workers with it, so none
    is left holding the caller's stdout and stderr open. Linux only (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the caller died before the signal was armed
        os._exit(1)


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    """Workers inherit the environment at start-up: give each `n` BLAS threads, not all cores."""
    saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
    os.environ.update({k: str(n) for k in _BLAS_THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_pool(jobs, options, workers, results, progress) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: the caller may hold torch / onnxruntime threads that fork would copy.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),))
    with _blas_threads(threads), pool:
        # Largest jobs first so the pool does not end waiting on one big job.
        order = sorted(range(len(jobs)), key=lambda i: -np.asarray(jobs[i][0]).size * int(jobs[i][1]))
        futures = {pool.submit(_run_job, np.asarray(jobs[i][0]), int(jobs[i][1]), options): i
                   for i in order}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            progress.update(1)


def decompose_many(jobs: Sequence[tuple[np.ndarray, int]], *, workers: int | None = None,
                   method: str = "nls", seed: int = 0, desc: str = "decomposing",
                   **kwargs) -> list[CPResult]:
    """decompose(kernel, rank, method=method, seed=seed, **kwargs) for each job, in job order.

    workers: processes to use; 1 runs in this process. Default: one per CPU and at most one per
        job, or 1 when the jobs are too small to repay starting worker processes (each imports
        onnx_cp, about a second).
    Invalid arguments raise UsageError before any worker starts.
    """
    jobs = list(jobs)
    if workers is None:
        work = sum(np.asarray(k).size * int(r) for k, r in jobs if np.ndim(k) == 4 and np.size(k))
        workers = (os.cpu_count() or 1) if work > INLINE_BELOW else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
    for job in jobs:
        if not isinstance(job, (tuple, list)) or len(job) != 2:
            raise UsageError("each decompose_many job must be a (kernel, rank) pair")
    options = dict(kwargs, method=method, seed=seed)
    workers = min(workers, max(len(jobs), 1))
    progress = bar(len(jobs), desc)
    try:
        if workers == 1:
            results = []
            for kernel, rank in jobs:
                results.append(_run_job(kernel, rank, options))
                progress.update(1)
            return results
        # Validate up front so a user error surfaces as one line, not a worker traceback.
        for kernel, rank in jobs:
            check_args(kernel, rank, method, options.get("bound"), options.get("ridge", 0.0),
                       options.get("time_limit"), options.get("max_iter"), options.get("tol", 0.0))
        results: list[CPResult | None] = [None] * len(jobs)
        try:
            _run_pool(jobs, options, workers, results, progress)
        except BrokenProcessPool:
            # spawn re-imports the caller's __main__; from stdin, or a script whose top level is not
            # guarded by `if __name__ == "__main__":`, the workers die. Finish in this process.
            warnings.warn("onnx_cp.cp: worker processes failed to start; decomposing in this process "
                          "(guard your script's top level with `if __name__ == \"__main__\":`)",
                          RuntimeWarning, stacklevel=2)
            for i, (kernel, rank) in enumerate(jobs):
                if results[i] is None:
                    results[i] = _run_job(kernel, rank, options)
                    progress.update(1)
        return results  # type: ignore[return-value]
    finally:
        progress.close()
