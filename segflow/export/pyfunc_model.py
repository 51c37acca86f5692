"""The code MLflow runs to load a segflow IR model (models-from-code logging).

MLflow copies this file into the logged model; ``mlflow.pyfunc.load_model`` executes it instead of
unpickling a ``python_model.pkl``, so loading a model runs only code that is in plain sight here
and in the installed segflow package.
"""

import mlflow

from segflow.export.pyfunc import SegmentationModel

mlflow.models.set_model(SegmentationModel())
