"""KFP components, one per stage, installed with segflow as ``segflow_kfp``.

Each component takes typed artifacts and parameters, calls one ``segflow.stages`` function, and
returns artifacts, metadata and the stage's metrics. The work itself lives in ``segflow``.

The component image is the project's own (``images/Dockerfile``), which already holds kfp and
segflow, so components never pip-install at start (``install_kfp_package=False``).
"""

import os

# Compile-time choice of image; CI and releases set SEGFLOW_IMAGE to the pushed tag.
SEGFLOW_IMAGE = os.environ.get("SEGFLOW_IMAGE", "ghcr.io/segflow/segflow:0.1.0")
SEGFLOW_GPU_IMAGE = os.environ.get("SEGFLOW_GPU_IMAGE", "ghcr.io/segflow/segflow-cuda:0.1.0")
