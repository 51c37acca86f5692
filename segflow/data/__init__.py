"""Datasets: synthetic scenes, import and validation, torch datasets, augmentations."""

# The label value that marks "no label" in every mask segflow reads or writes.
IGNORE_INDEX = 255

# Pillow refuses images over twice its MAX_IMAGE_PIXELS as possible decompression bombs; segflow
# keeps that default, and `segflow predict --max-image-pixels N` raises it for a user who means it.
MAX_IMAGE_PIXELS = 2 * 89_478_485
