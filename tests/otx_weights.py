"""Deterministic, non-trivial weights for a list of (key, shape) pairs: the same numbers in any
environment (numpy's PCG64, seeded per key), so a fixture needs only the key list and the
reference's logits, not megabytes of weights.

Imported by the tests and by fixtures/otx_reference/make.py, which runs in OTX's own environment.
"""

from __future__ import annotations

import zlib

import numpy as np


def weight(key: str, shape: list[int], seed: int = 0) -> np.ndarray:
    """Conv weights ~ N(0, 1/fan_in), so activations stay in range through the doubled fuse
    paths; BatchNorm affine and running statistics away from 0 and 1, so that normalisation is
    exercised; biases small."""
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(key.encode())]))
    name = key.rsplit(".", 1)[-1]
    if name == "num_batches_tracked":
        return np.zeros(shape, dtype=np.int64)
    if name == "running_var":
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if name == "running_mean":
        return rng.normal(0.0, 0.2, shape).astype(np.float32)
    if name == "bias":
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    if len(shape) == 1:  # a norm's scale
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return rng.normal(0.0, np.sqrt(1.0 / fan_in), shape).astype(np.float32)


def state(keys: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    return {key: weight(key, shape, seed) for key, shape in sorted(keys.items())}


def image(size: int, seed: int = 0) -> np.ndarray:
    """A 1x3xSxS float input, roughly normalised."""
    return np.random.Generator(np.random.PCG64([seed, 7])).normal(0.0, 1.0, (1, 3, size, size)).astype(np.float32)
