"""Work spread over processes: how many cores this process may use, and one forked pool helper."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from segflow.errors import SegflowError
from segflow.progress import progress

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """Cores available to this process (its affinity mask where the OS has one, as on Linux)."""
    counter = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if counter is not None:
        return counter() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def forked_map(
    func: Callable[[T], R], items: list[T], workers: int, desc: str, min_parallel: int = 4, ordered: bool = True
) -> Iterator[R]:
    """``map(func, items)`` in forked worker processes, with progress.

    Forked workers inherit the parent's memory (datasets, lazy loaders) instead of pickling it.
    Serial below ``min_parallel`` items or with one worker: forking costs more than it saves.
    A worker that dies (killed for memory, a crash in a decoder) ends the map with an error that
    says so: multiprocessing.Pool would wait for its result forever; this executor notices.
    """
    workers = workers or cpu_count()
    total = len(items)
    if workers == 1 or total < min_parallel:
        yield from progress(map(func, items), total, desc)
        return
    chunks = max(1, total // (workers * 8))
    batches = [items[i : i + chunks] for i in range(0, total, chunks)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_run_batch, func, batch) for batch in batches]
        finished = futures if ordered else as_completed(futures)
        try:
            results = (result for future in finished for result in future.result())
            yield from progress(results, total, desc)
        except BrokenProcessPool:
            raise SegflowError(
                f"{desc}: a worker process died (killed for memory, or a crash in a library reading a file). "
                "Run again with --workers 1 to find the item that does it, or give the machine more memory."
            ) from None
        finally:
            for future in futures:
                future.cancel()


def _run_batch(func: Callable[[T], R], batch: list[T]) -> list[R]:
    return [func(item) for item in batch]


def map_all(func: Callable[[T], R], items: Iterable[T], workers: int, desc: str, **kwargs) -> list[R]:
    return list(forked_map(func, list(items), workers, desc, **kwargs))
