"""How fast an OpenVINO model runs on this machine's CPU: latency of one image and throughput of
a queue of images, measured the way segflow's IR runtime compiles it."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Speed:
    latency_ms: float  # median of single-image requests (PERFORMANCE_HINT LATENCY)
    throughput: float  # images per second through an async queue (PERFORMANCE_HINT THROUGHPUT)


# f32 outside any INT8 ops: what the parity check (IRSegmentor's default) runs; CPUs with AMX or
# AVX512-BF16 would otherwise run those ops in bf16.
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def compile_properties(precision: str, threads: int = 0) -> dict:
    """f32 execution for FP32/FP16 IRs (CPUs with AMX would otherwise run bf16 and drift from
    PyTorch); the plugin's own choice for INT8."""
    properties: dict = {} if precision == "int8" else dict(F32)
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    return properties


def measure(ov_model, size: int, precision: str, runs: int = 20, queued: int = 32, threads: int = 0) -> Speed:
    """Latency and throughput of ``ov_model`` (an ``openvino.Model``) on 1 x 3 x size x size input."""
    import openvino as ov

    core = ov.Core()
    properties = compile_properties(precision, threads)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    request = core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **properties}).create_infer_request()
    request.infer({0: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({0: x})
        times.append(time.perf_counter() - start)
    queue = ov.AsyncInferQueue(core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **properties}))
    for _ in range(2):
        queue.start_async({0: x})
    queue.wait_all()
    start = time.perf_counter()
    for _ in range(queued):
        queue.start_async({0: x})
    queue.wait_all()
    return Speed(1000 * statistics.median(times), queued / (time.perf_counter() - start))
