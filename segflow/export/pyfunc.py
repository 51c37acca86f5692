"""The IR as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(images)` gives masks.

MLflow has no OpenVINO flavour, so the IR folder travels as a pyfunc artifact and this class
runs it. Input: a list of images, or a DataFrame with an ``image`` column; each image is an
HxWx3 uint8 RGB array, encoded bytes (PNG/JPEG), or a file path. Output: a list of HxW uint8
label masks, each at its image's size.

The model is logged "from code" (``pyfunc_model.py``): loading it executes that file, and never
unpickles anything, so a logged model can be loaded without trusting a pickle.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow.pyfunc
import numpy as np


def _to_rgb(item) -> np.ndarray:
    from PIL import Image

    if isinstance(item, np.ndarray):
        return item.astype(np.uint8)
    if isinstance(item, bytes | bytearray):
        return np.asarray(Image.open(io.BytesIO(item)).convert("RGB"))
    return np.asarray(Image.open(item).convert("RGB"))


class SegmentationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from segflow.models.artifact import load_ir

        self.model, _ = load_ir(context.artifacts["ir_dir"])

    def predict(self, context, model_input, params=None) -> list[np.ndarray]:
        from segflow.export.predict import model_input as to_model_input
        from segflow.export.predict import probabilities
        from segflow.models.tiling import segment_image

        items = list(model_input["image"]) if hasattr(model_input, "columns") else list(model_input)
        masks = []
        for item in items:
            image = _to_rgb(item)
            if self.model.config.get("tiling"):  # tiled exactly as `segflow predict` tiles
                masks.append(segment_image(self.model, image, self.model.config)[0])
                continue
            logits = self.model(to_model_input(image, self.model.config)).logits
            masks.append(probabilities(logits, image.shape[:2]).argmax(0).astype(np.uint8))
        return masks


def log_ir(ir_dir: str, name: str = "model") -> tuple[str, str]:
    """Log the IR folder as a pyfunc model in the active run; return (model URI, logged model id)."""
    import openvino

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"ir_dir": str(ir_dir)},
        pip_requirements=[f"openvino=={openvino.__version__.split('-')[0]}", "segflow"],
    )
    return info.model_uri, info.model_id
