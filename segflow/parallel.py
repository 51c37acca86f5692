"""Work spread over processes: how many cores this process may use, and one forked pool helper."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

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
    """
    workers = workers or cpu_count()
    total = len(items)
    if workers == 1 or total < min_parallel:
        yield from progress(map(func, items), total, desc)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        chunks = max(1, total // (workers * 8))
        mapper = pool.imap if ordered else pool.imap_unordered
        yield from progress(mapper(func, items, chunksize=chunks), total, desc)


def map_all(func: Callable[[T], R], items: Iterable[T], workers: int, desc: str, **kwargs) -> list[R]:
    return list(forked_map(func, list(items), workers, desc, **kwargs))
