"""segflow: label-efficient, domain-adaptive semantic segmentation pipelines."""

from segflow.errors import SegflowError

__version__ = "0.1.0"
__all__ = ["SegflowError", "__version__"]
