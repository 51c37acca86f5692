"""Processes: segflow.parallel's forked map (import, pseudo masks) and how a segflow process ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from segflow.errors import SegflowError
from segflow.parallel import map_all


def square(x: int) -> int:
    return x * x


def dies_on_five(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    return x


def test_forked_map_gives_the_serial_results_in_order_or_not():
    items = list(range(40))
    assert map_all(square, items, workers=2, desc="squares") == [x * x for x in items]
    assert sorted(map_all(square, items, workers=2, desc="squares", ordered=False)) == [x * x for x in items]
    assert map_all(square, items[:3], workers=2, desc="few") == [0, 1, 4]  # serial below min_parallel


@pytest.mark.timeout(60)
def test_a_worker_that_dies_ends_the_map_with_an_error_instead_of_a_wait():
    with pytest.raises(SegflowError, match=r"checking items: a worker process died.*--workers 1"):
        map_all(dies_on_five, list(range(12)), workers=2, desc="checking items")


def test_a_segflow_process_skips_the_collectors_last_passes_at_exit():
    """segflow freezes the garbage collector at exit (benchmarks/process_exit.py: a second per
    command and pipeline task). A handler registered before segflow's import runs after it."""
    child = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "import segflow\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "frozen at exit: True", done.stdout + done.stderr
