"""Progress for long work: a bar on a terminal, a few plain log lines anywhere else (pipelines, CI)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("segflow.progress")


def progress(items: Iterable[T], total: int, desc: str, every_s: float = 10.0) -> Iterator[T]:
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit="it", leave=False)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            log.info("%s: %d/%d (%.1f/s)", desc, done, total, done / (now - start))
            last = now
    log.info("%s: %d/%d done in %.1fs", desc, done, total, time.monotonic() - start)
