"""Label colours for masks and overlays: one leaf module that synthesis, evaluation and prediction
all import (it imports nothing of segflow's)."""

from __future__ import annotations

import numpy as np

# Display colours (Cityscapes-like) of the built-in street classes, in label order; other label
# sets continue with Datumaro's generated colours. They are not the colours scenes are rendered in.
STREET_COLORS: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180),
    (70, 70, 70),
    (128, 64, 128),
    (244, 35, 232),
    (107, 142, 35),
    (0, 0, 142),
    (220, 20, 60),
)


def palette(num_classes: int) -> np.ndarray:
    """256 x 3 uint8: a colour per class id (ids past ``num_classes``, and 255 = ignore, are black)."""
    from datumaro.util.mask_tools import generate_colormap

    colours = np.zeros((256, 3), dtype=np.uint8)
    generated = generate_colormap(max(num_classes, len(STREET_COLORS)) + 1)
    for i in range(num_classes):
        colours[i] = STREET_COLORS[i] if i < len(STREET_COLORS) else generated[i + 1]
    return colours
