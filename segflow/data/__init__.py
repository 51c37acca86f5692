"""Datasets: synthetic scenes, import and validation, torch datasets, augmentations."""

# The label value that marks "no label" in every mask segflow reads or writes.
IGNORE_INDEX = 255
