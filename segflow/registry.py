"""The model registry: every exported model becomes a version; ``@champion`` is the one that serves.

    decision = register(client, "street-seg", candidate, margin=0.01, rescore=evaluate_on_new_val)

A new version always becomes ``@challenger``. It takes ``@champion`` only when its score beats the
champion's by more than ``margin`` on the same validation data: when the champion was scored on
data with another fingerprint, ``rescore`` evaluates it again on the new version's data first.
The decision and its reason are tags on the version; the scores are tags too, so ``segflow models
compare`` and the UI show them without opening any run.

Two pipelines may register at the same moment. MLflow numbers their versions atomically, so every
version is recorded. The champion alias has no compare-and-set, so a promoter checks again after a
short wait and contends until the alias names the better version (see ``_settle``); both end with
exactly one champion, the better of the two. A version that held @champion and lost it gets
``segflow.superseded_by`` (the version that took it); its decision tag says what it decided then.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from segflow.errors import SegflowError

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_PREFIX = "segflow.score."  # a version's headline scores, as tags: segflow.score.val_mDice
VAL_FINGERPRINT = "segflow.validation_fingerprint"
TRAIN_FINGERPRINT = "segflow.training_fingerprint"
SOURCE_FINGERPRINT = "segflow.source_fingerprint"  # the raw data it was trained on (pipelines/retrain.py)
DRIFT_REFERENCE = "segflow.drift_reference"  # segflow.evaluate.drift statistics on its validation images
MODEL_ARTIFACT = "segflow.model_artifact"  # the segflow model folder (PyTorch), for re-scoring
TRAINING_DATA = "segflow.training_data"  # the dataset artifact it was trained on (the source when adapting)
ADAPTED_TO = "segflow.adapted_to"  # fingerprint of the unlabelled images an adapted version was adapted to
DECISION, REASON = "segflow.decision", "segflow.reason"
SUPERSEDED_BY = "segflow.superseded_by"  # set on a champion when a later version takes @champion from it
SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class Candidate:
    """A model to register: its logged model (the OpenVINO IR), where its segflow model artifact
    lives, its validation scores (val_mDice, val_dice_CLASS, ...) and the data fingerprints."""

    model_id: str
    model_artifact: str
    scores: dict[str, float]
    validation_fingerprint: str
    training_fingerprint: str
    run_id: str = ""  # the pipeline's parent run
    run_link: str = ""
    extra_tags: dict[str, str] = field(default_factory=dict)


def scores_of(version) -> dict[str, float]:
    return {k[len(SCORE_PREFIX) :]: float(v) for k, v in version.tags.items() if k.startswith(SCORE_PREFIX)}


def champion(client, name: str, alias: str = CHAMPION):
    """The version under @champion (or another alias), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="segflow segmentation model (OpenVINO IR)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def champion_scores(client, name: str, version, fingerprint: str, rescore: Callable[[str], dict] | None) -> dict:
    """The champion's scores on validation data ``fingerprint``: its own tags when it was scored on
    that data, otherwise ``rescore(model_artifact)`` (recorded on it for the next comparison)."""
    if version.tags.get(VAL_FINGERPRINT) == fingerprint:
        return scores_of(version)
    key = f"segflow.rescored.{fingerprint[:16]}"
    if key in version.tags:
        return json.loads(version.tags[key])
    if rescore is None or not version.tags.get(MODEL_ARTIFACT):
        raise SegflowError(
            f"registered model {name!r}: champion version {version.version} was scored on other validation data "
            "and cannot be re-evaluated (it has no segflow model artifact). Register it again, or compare by hand."
        )
    scores = rescore(version.tags[MODEL_ARTIFACT])
    client.set_model_version_tag(name, version.version, key, json.dumps(scores))
    return scores


def register(
    client,
    name: str,
    candidate: Candidate,
    metric: str = "val_mDice",
    margin: float = 0.0,
    rescore: Callable[[str], dict] | None = None,
) -> dict:
    """Register ``candidate`` as a new version of ``name``, make it @challenger, and @champion when
    it beats the champion by more than ``margin`` on ``metric``; returns the decision."""
    if metric not in candidate.scores:
        raise SegflowError(f"--metric {metric!r}: the candidate has no such score (it has {sorted(candidate.scores)}).")
    _ensure_model(client, name)
    tags = {
        **{f"{SCORE_PREFIX}{k}": str(v) for k, v in candidate.scores.items()},
        VAL_FINGERPRINT: candidate.validation_fingerprint,
        TRAIN_FINGERPRINT: candidate.training_fingerprint,
        MODEL_ARTIFACT: candidate.model_artifact,
        **candidate.extra_tags,
    }
    version = client.create_model_version(
        name,
        source=f"models:/{candidate.model_id}",
        run_id=candidate.run_id or None,
        tags=tags,
        run_link=candidate.run_link or None,
        model_id=candidate.model_id,
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    current = champion(client, name)
    mine = candidate.scores[metric]
    if current is None:
        promote, reason = True, f"first version: {metric} {mine:.4f}"
    else:
        theirs = champion_scores(client, name, current, candidate.validation_fingerprint, rescore)[metric]
        promote = mine > theirs + margin
        verb = "beats" if promote else "does not beat"
        reason = f"{metric} {mine:.4f} {verb} champion v{current.version} ({theirs:.4f}) by more than {margin}"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        if current is not None:
            _mark_superseded(client, name, current.version, str(version.version))
        promote, reason = _settle(client, name, str(version.version), candidate, metric, margin, rescore, reason)
    decision = CHAMPION if promote else CHALLENGER
    client.set_model_version_tag(name, version.version, DECISION, decision)
    client.set_model_version_tag(name, version.version, REASON, reason)
    return {"name": name, "version": int(version.version), "decision": decision, "reason": reason, metric: mine}


def _settle(client, name: str, mine: str, candidate: Candidate, metric: str, margin: float, rescore, reason: str):
    """After setting @champion, wait and look again: a registration that raced ours may have moved
    the alias. Take it back only when ours is better by the margin; otherwise theirs stands."""
    for _ in range(5):
        time.sleep(SETTLE_SECONDS)
        current = champion(client, name)
        if current is None or str(current.version) == mine:
            return True, reason
        theirs = champion_scores(client, name, current, candidate.validation_fingerprint, rescore)[metric]
        if candidate.scores[metric] <= theirs + margin:
            return False, (
                f"{reason}, but v{current.version} ({theirs:.4f}), registered at the same time, took @champion"
            )
        client.set_registered_model_alias(name, CHAMPION, mine)
        # Its own decision tag may already say champion (its settling ended first): this says why it is not.
        _mark_superseded(client, name, current.version, mine)
    return True, reason


def _mark_superseded(client, name: str, version: str, by: str) -> None:
    """Tag ``version`` as superseded by ``by``. Two racing registrations may tag the same old
    champion at once; MLflow's tag write is not an upsert then, and the loser of that insert race
    writes again (an update by then)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.set_model_version_tag(name, version, SUPERSEDED_BY, by)
            return
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.2)


def comparison(client, name: str, versions: list[str] | None = None) -> tuple[list[str], dict[str, dict]]:
    """(version labels, metric -> {label: value}) of ``versions`` (default: @champion, @challenger)."""
    from mlflow.exceptions import MlflowException

    chosen = []
    try:
        if versions:
            chosen = [client.get_model_version(name, str(v)) for v in versions]
        else:
            seen = {}
            for alias in (CHAMPION, CHALLENGER):
                try:
                    v = client.get_model_version_by_alias(name, alias)
                    seen.setdefault(v.version, v)
                except MlflowException:
                    pass
            chosen = list(seen.values())
    except MlflowException as exc:
        raise SegflowError(f"registered model {name!r}: {exc.message}") from None
    if not chosen:
        raise SegflowError(f"registered model {name!r} has no versions to compare: run a pipeline that registers one.")
    labels = []
    for v in chosen:
        aliases = [a for a in (v.aliases or []) if a in (CHAMPION, CHALLENGER)]
        labels.append(f"v{v.version}" + "".join(f" @{a}" for a in aliases))
    table: dict[str, dict] = {}
    for label, v in zip(labels, chosen, strict=True):
        for metric, value in scores_of(v).items():
            table.setdefault(metric, {})[label] = value
    return labels, dict(sorted(table.items(), key=lambda kv: (not kv[0].endswith(("mDice", "mIoU")), kv[0])))
