"""The retraining policy: what a scheduled tick does with the data it finds, and how adaptation
candidates are named and picked. Pure functions, no MLflow, no storage: the stages open the
inputs, call these, and log what they return; pipelines compare against ``Decision`` values.

A tick's data is, against the registered champion:
- ``same``: the files the champion was trained on (its source fingerprint): nothing to do;
- ``adapted``: unlabelled images the champion or the challenger was already adapted to;
- ``new``: anything else that can be trained on (labelled, or no champion to compare with);
- ``shifted``: unlabelled images whose drift score passes the threshold, with the champion's
  training data known: adapt the champion to them;
- ``unlabelled``: unlabelled images without drift (or no training data to adapt from).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from segflow.errors import SegflowError


class Decision(StrEnum):
    SAME = "same"
    NEW = "new"
    SHIFTED = "shifted"
    UNLABELLED = "unlabelled"
    ADAPTED = "adapted"


@dataclass(frozen=True)
class Champion:
    """What the registry says about the current champion (the tags the policy reads)."""

    version: int
    source_fingerprint: str = ""  # of the files it was trained on
    model: str = ""  # its model artifact
    data: str = ""  # the dataset artifact it was trained on ("" if not recorded)
    drift_reference: str = ""  # JSON: how it sees its validation images ("" if not recorded)


def first_look(fingerprint: str, champion: Champion | None, adapted_version: int | None) -> Decision:
    """The decision before any image is opened: ``new`` means "look closer" when
    ``needs_drift`` says so."""
    if champion is not None and champion.source_fingerprint == fingerprint:
        return Decision.SAME
    if adapted_version is not None:
        return Decision.ADAPTED
    return Decision.NEW


def needs_drift(decision: Decision, champion: Champion | None) -> bool:
    """New data beside a champion that recorded how it sees its own validation images: measure drift."""
    return decision is Decision.NEW and champion is not None and bool(champion.drift_reference)


def after_drift(champion: Champion, labelled: bool, drift_score: float, threshold: float) -> Decision:
    """Labelled data is trained on; unlabelled images are adapted to when they drifted and the
    champion's training data (the labelled source) is known."""
    if labelled:
        return Decision.NEW
    if drift_score > threshold and champion.data:
        return Decision.SHIFTED
    return Decision.UNLABELLED


def note(
    decision: Decision,
    data_uri: str,
    fingerprint: str,
    champion: Champion | None,
    adapted_version: int | None = None,
    drift_score: float = 0.0,
    threshold: float = 0.0,
) -> str:
    """The line the pipeline's parent run shows for the decision (tag segflow.retrain)."""
    score = f"{drift_score:.3f}"
    version = champion.version if champion is not None else 0
    if decision is Decision.SAME:
        return f"no new data: {data_uri} is what champion v{version} was trained on"
    if decision is Decision.NEW:
        return f"new data: {data_uri} (fingerprint {fingerprint[:16]})"
    if decision is Decision.SHIFTED:
        return f"unlabelled images that drifted (score {score} > {threshold}): adapt the champion"
    if decision is Decision.ADAPTED:
        return f"unlabelled images v{adapted_version or 0} was already adapted to: nothing to do"
    if drift_score > threshold:
        return (
            f"unlabelled images that drifted (score {score} > {threshold}), but champion v{version} records no "
            "training data to adapt from: retrain it with this version"
        )
    return f"unlabelled images, no drift (score {score} <= {threshold}): nothing to do"


def candidate_name(method: str, levels: str) -> str:
    """An adaptation candidate's name in a pipeline: AdaptSegNet's two variants apart."""
    return f"{method}-{levels}" if method == "adaptsegnet" else method


def pick_members(candidates: dict[str, str], members: list[str]) -> list[str]:
    """The paths of the ``members`` among named ``candidates`` (name -> path), in ``members``' order."""
    missing = sorted(set(members) - set(candidates))
    if missing:
        raise SegflowError(
            f"no candidate named {', '.join(missing)} among {', '.join(sorted(candidates)) or 'none'}: "
            "run those adaptation branches, or name members that ran."
        )
    return [candidates[name] for name in members]


SOURCE_ONLY = "source-only"


def candidate_table(
    source_only: tuple[str, str], adapted: list[tuple[str, str, str]], ensemble: tuple[str, str, str]
) -> dict[str, tuple[str, str]]:
    """Name -> (model, its evaluation) of everything an adaptation pipeline chooses among: the
    source-only model, each adapted model and the ensemble ((name, model, evaluation) each). Two
    candidates of one name would hide one another: refused."""
    table = {SOURCE_ONLY: source_only}
    for name, model, evaluation in [*adapted, ensemble]:
        if name in table:
            raise SegflowError(f"two candidates are named {name!r}: each adaptation branch needs its own method.")
        table[name] = (model, evaluation)
    return table


__all__ = [
    "SOURCE_ONLY",
    "Champion",
    "Decision",
    "after_drift",
    "candidate_name",
    "candidate_table",
    "first_look",
    "needs_drift",
    "note",
    "pick_members",
]
