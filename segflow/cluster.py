"""Where a compiled pipeline's tasks run on Kubernetes: images, GPU placement, resources, retries.

Clusters label and taint their GPU pools their own way (GKE: ``cloud.google.com/gke-accelerator``
and an ``nvidia.com/gpu=present:NoSchedule`` taint; EKS and on-prem pools: whatever the platform
team chose), so these are compile-time settings, from ``segflow compile`` / ``segflow submit``
flags or a YAML file (``--cluster-config``):

    image: registry.example.com/segflow:0.1.0          # CPU stages
    gpu_image: registry.example.com/segflow-cuda:0.1.0  # GPU stages: pretrain, train, adapt
    gpus: 2                                             # per GPU pod; >1 runs torchrun in the pod
    gpu_node_selector: {cloud.google.com/gke-accelerator: nvidia-l4}
    gpu_tolerations: ["nvidia.com/gpu=present:NoSchedule"]
    cpu_request: "2"
    memory_request: 8G
    gpu_cpu_request: "8"
    gpu_memory_request: 32G
    retries: 3                                          # every task; exponential backoff

Only GPU stages get the GPU settings; CPU stages get none of them. The local runner
(``segflow run --local``) ignores placement and runs without retries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from segflow.errors import SegflowError

EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Toleration:
    key: str
    effect: str
    value: str = ""  # empty: operator Exists (any value)

    @property
    def operator(self) -> str:
        return "Equal" if self.value else "Exists"

    @classmethod
    def parse(cls, text: str, setting: str = "--gpu-toleration") -> Toleration:
        """``KEY[=VALUE]:EFFECT``, e.g. ``nvidia.com/gpu=present:NoSchedule``."""
        head, sep, effect = str(text).rpartition(":")
        key, _, value = head.partition("=")
        if not sep or not key or effect not in EFFECTS:
            raise SegflowError(
                f"{setting} {text!r}: write KEY[=VALUE]:EFFECT with EFFECT one of {', '.join(EFFECTS)}, "
                "e.g. nvidia.com/gpu=present:NoSchedule."
            )
        _check_label(key, setting)
        return cls(key=key, effect=effect, value=value)


@dataclass(frozen=True)
class ClusterConfig:
    image: str = ""  # CPU stages; empty: $SEGFLOW_IMAGE or the default tag
    gpu_image: str = ""  # GPU stages; empty: $SEGFLOW_GPU_IMAGE or the default tag
    gpus: int = 1
    accelerator: str = "nvidia.com/gpu"
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu", "NoSchedule"),)
    cpu_request: str = ""  # CPU stages; empty: each stage's own default
    memory_request: str = ""
    gpu_cpu_request: str = "4"
    gpu_memory_request: str = "16G"
    retries: int = 3
    backoff_seconds: int = 60  # first retry after this, then doubling ...
    backoff_max_seconds: int = 3600  # ... up to this

    def validate(self) -> ClusterConfig:
        if self.gpus < 1:
            raise SegflowError(f"--gpus must be at least 1 (got {self.gpus}).")
        if self.retries < 0:
            raise SegflowError(f"--retries must be 0 or more (got {self.retries}).")
        for name in ("cpu_request", "memory_request", "gpu_cpu_request", "gpu_memory_request"):
            value = getattr(self, name)
            if value and not _QUANTITY.match(value):
                raise SegflowError(f"{name} {value!r} is not a Kubernetes quantity (e.g. 2, 500m, 8G, 16Gi).")
        for key in self.gpu_node_selector:
            _check_label(key, "--gpu-node-selector")
        return self


def _check_label(key: str, setting: str) -> None:
    if not _LABEL.match(key):
        raise SegflowError(f"{setting}: {key!r} is not a Kubernetes label or taint key.")


def parse_selector(pairs: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (``--gpu-node-selector``)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SegflowError(
                f"--gpu-node-selector {pair!r}: write KEY=VALUE, e.g. cloud.google.com/gke-accelerator=nvidia-l4."
            )
        out[key] = value
    return out


def load(path: str | Path | None = None, **overrides) -> ClusterConfig:
    """The settings of a YAML file (or the defaults), with flags that were given on top."""
    base = ClusterConfig()
    if path:
        base = _from_file(Path(path))
    given = {k: v for k, v in overrides.items() if v not in (None, "", [], ())}
    if "gpu_tolerations" in given:
        given["gpu_tolerations"] = tuple(Toleration.parse(t) for t in given["gpu_tolerations"])
    if "gpu_node_selector" in given:
        given["gpu_node_selector"] = parse_selector(given["gpu_node_selector"])
    return replace(base, **given).validate()


def _from_file(path: Path) -> ClusterConfig:
    import yaml

    if not path.is_file():
        raise SegflowError(f"--cluster-config {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SegflowError(f"--cluster-config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SegflowError(f"--cluster-config {path} must be a mapping of settings (image: ..., gpus: ...).")
    known = {f.name for f in fields(ClusterConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SegflowError(f"--cluster-config {path}: unknown settings {unknown}; known: {', '.join(sorted(known))}.")
    if "gpu_tolerations" in data:
        if not isinstance(data["gpu_tolerations"], list):
            raise SegflowError(f"--cluster-config {path}: gpu_tolerations must be a list of KEY[=VALUE]:EFFECT.")
        data["gpu_tolerations"] = tuple(
            Toleration.parse(t, f"{path}: gpu_tolerations") for t in data["gpu_tolerations"]
        )
    if "gpu_node_selector" in data and not isinstance(data["gpu_node_selector"], dict):
        raise SegflowError(f"--cluster-config {path}: gpu_node_selector must be a mapping of label: value.")
    for name in ("gpus", "retries", "backoff_seconds", "backoff_max_seconds"):
        if name in data and not isinstance(data[name], int):
            raise SegflowError(f"--cluster-config {path}: {name} must be a whole number (got {data[name]!r}).")
    for name in ("cpu_request", "memory_request", "gpu_cpu_request", "gpu_memory_request", "image", "gpu_image"):
        if name in data:
            data[name] = str(data[name])
    return ClusterConfig(**data)


LOCAL = ClusterConfig(retries=0)  # what `segflow run --local` builds with
