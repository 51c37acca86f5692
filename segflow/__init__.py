"""segflow: label-efficient, domain-adaptive semantic segmentation pipelines."""

import atexit
import gc

from segflow.errors import SegflowError

__version__ = "0.1.0"
__all__ = ["SegflowError", "__version__"]

# At exit, Python's garbage collector makes its last full passes over every object torch, MLflow
# and SQLAlchemy created: over a second in every command and pipeline task, to free memory the
# operating system takes back anyway. Frozen objects are left out of those passes; registered on
# first import, this runs after the handlers registered later (MLflow's flushes, for one).
atexit.register(gc.freeze)
