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

import functools
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

    def validate(self, source: str = "") -> ClusterConfig:
        """Every setting's type and range; ``source`` names where the settings came from (a
        --cluster-config file) in the message, which also names the setting."""
        where = f"{source}: " if source else ""

        def bad(name: str, what: str) -> SegflowError:
            setting = name if source else f"--{name.replace('_', '-')}"
            return SegflowError(f"{where}{setting} {getattr(self, name)!r} {what}")

        for name, (low, high) in _WHOLE_NUMBERS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be a whole number.")
            if not low <= value <= high:
                raise bad(name, f"must be between {low} and {high}.")
        if self.backoff_max_seconds < self.backoff_seconds:
            raise bad("backoff_max_seconds", f"must be at least backoff_seconds ({self.backoff_seconds}).")
        for name in ("image", "gpu_image", "accelerator", *_QUANTITIES):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "must be a single string.")
        for name in ("image", "gpu_image"):
            if getattr(self, name) and not _IMAGE.match(getattr(self, name)):
                raise bad(name, "is not a container image reference (e.g. registry.example.com/segflow:0.1.0).")
        if not _RESOURCE.match(self.accelerator):
            raise bad("accelerator", "is not a Kubernetes extended resource name (e.g. nvidia.com/gpu).")
        for name in _QUANTITIES:
            value = getattr(self, name)
            if value and not _QUANTITY.match(value):
                raise bad(name, "is not a Kubernetes quantity (e.g. 2, 500m, 8G, 16Gi).")
        if not isinstance(self.gpu_node_selector, dict):
            raise bad("gpu_node_selector", "must be a mapping of label: value.")
        for key, value in self.gpu_node_selector.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise SegflowError(f"{where}gpu_node_selector {key!r}: {value!r}: label and value must be strings.")
            _check_label(key, f"{where}gpu_node_selector")
            if value and not _LABEL_VALUE.match(value):
                raise SegflowError(f"{where}gpu_node_selector {key}: {value!r} is not a Kubernetes label value.")
        return self


# Ranges: a retry count or a backoff beyond these is a typo, and kfp's own messages name neither
# the file nor the setting.
_WHOLE_NUMBERS = {
    "gpus": (1, 64),
    "retries": (0, 100),
    "backoff_seconds": (0, 86_400),
    "backoff_max_seconds": (0, 7 * 86_400),
}
_QUANTITIES = ("cpu_request", "memory_request", "gpu_cpu_request", "gpu_memory_request")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,511}$")
_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


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


@functools.cache
def _no_alias_loader() -> type:
    """A safe YAML loader that refuses anchors and aliases (made on first use: yaml is imported
    lazily). A settings file needs neither, and nested aliases expand exponentially (a "billion
    laughs" file of nine levels of nine aliases never finishes loading)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
                raise yaml.composer.ComposerError(
                    None, None, "anchors and aliases (&name, *name) are not allowed in a settings file",
                    self.peek_event().start_mark,
                )  # fmt: skip
            return super().compose_node(parent, index)

    return Loader


def _from_file(path: Path) -> ClusterConfig:
    import yaml

    if not path.is_file():
        raise SegflowError(f"--cluster-config {path} does not exist.")
    if path.stat().st_size > 1_000_000:
        raise SegflowError(f"--cluster-config {path} is over 1 MB: a settings file is a few lines.")
    try:
        data = yaml.load(path.read_text(), Loader=_no_alias_loader()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SegflowError(f"--cluster-config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SegflowError(f"--cluster-config {path} must be a mapping of settings (image: ..., gpus: ...).")
    known = {f.name for f in fields(ClusterConfig)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise SegflowError(f"--cluster-config {path}: unknown settings {unknown}; known: {', '.join(sorted(known))}.")
    if "gpu_tolerations" in data:
        if not isinstance(data["gpu_tolerations"], list) or not all(
            isinstance(t, str) for t in data["gpu_tolerations"]
        ):
            raise SegflowError(f"--cluster-config {path}: gpu_tolerations must be a list of KEY[=VALUE]:EFFECT.")
        data["gpu_tolerations"] = tuple(
            Toleration.parse(t, f"{path}: gpu_tolerations") for t in data["gpu_tolerations"]
        )
    for name in _QUANTITIES:  # YAML reads `cpu_request: 2` as a number
        if isinstance(data.get(name), int | float) and not isinstance(data[name], bool):
            data[name] = str(data[name])
    selector = data.get("gpu_node_selector")
    if isinstance(selector, dict):  # `gpu-count: 1` is a label value too
        data["gpu_node_selector"] = {
            k: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for k, v in selector.items()
        }
    return ClusterConfig(**data).validate(f"--cluster-config {path}")


LOCAL = ClusterConfig(retries=0)  # what `segflow run --local` builds with
