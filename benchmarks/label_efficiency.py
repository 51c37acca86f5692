"""Label efficiency: plain supervised vs SupCon vs Mean Teacher vs DetCon self-SL then supervised,
with 8, 16 and 24 labelled images.

    .venv/bin/python benchmarks/label_efficiency.py [--family street|indoor] [--labeled 8 16 24] [--seeds 0 1 2]
        [--methods supervised supcon mean_teacher selfsl] [--epochs 30] [--iters 10] [--size 96]
        [--pretrain-epochs 20] [--budget 5 10 20 40] [--out FILE.json]

All on synthetic target-domain scenes (the camera look) of one family: ``street`` (the family the
methods were tuned on) or ``indoor`` (never tuned on: other classes, geometry, textures, balance):
- a labelled pool (the first N train images are used) with its own 16-image val subset, used
  only to pick the best epoch;
- a separate 48-image test set, on which every model is scored;
- 96 unlabelled images for Mean Teacher and for DetCon pretraining (the labelled pool's images
  are not among them). "selfsl" pretrains the backbone with DetCon on them once per seed with
  the defaults `segflow pretrain` uses (Felzenszwalb parameters, view size and learning rate
  chosen from the images: "auto"), then fine-tunes exactly like "supervised".

Every method gets the same data, seeds, model (lite_hrnet_s), and step budget
(epochs x iters per epoch). ``--budget`` adds the curve of self-SL gain over supervised against
DetCon pretraining epochs (at the first labelled count), and the gain with OTX's fixed self-SL
settings (Felzenszwalb scale / min size 1000, lr 1e-3) at --pretrain-epochs. The table shows the
mean and standard deviation of test mDice (percent) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from segflow.data.importer import ImportConfig
from segflow.data.synth import synthesize
from segflow.evaluate.evaluation import EvalConfig
from segflow.selfsl.config import PretrainConfig
from segflow.selfsl.pseudo_masks import FelzenszwalbParams
from segflow.stages import evaluate_stage, import_stage, pretrain_stage, train_stage
from segflow.train.config import TrainConfig, method_settings


def build_data(root: Path, size: int, family: str) -> dict[str, Path]:
    """Labelled pool (train 24 + val 16), test set (48), unlabelled images (96): disjoint seeds."""
    pool = root / "pool_raw"
    synthesize(pool / "train", "target", 24, size, seed=100, family_name=family)
    synthesize(pool / "val", "target", 16, size, seed=101, family_name=family)
    for p in (pool / "val").rglob("*.png"):  # distinct names from the train images
        p.rename(p.with_name("v" + p.name))
    # A val subset only: all 48 scored.
    synthesize(root / "test_raw" / "val", "target", 48, size, seed=102, family_name=family)
    unlabeled = synthesize(root / "unlabeled", "target", 96, size, seed=103, unlabeled=True, family_name=family)
    import_stage(ImportConfig(str(pool), str(root / "pool")), track=False)
    import_stage(ImportConfig(str(root / "test_raw"), str(root / "test")), track=False)
    return {"pool": root / "pool", "test": root / "test", "unlabeled": unlabeled}


# OTX's fixed self-SL settings (for ~512 px images, one pass an epoch): what the command line used
# before "auto".
OTX_PRETRAIN = {
    "felzenszwalb": FelzenszwalbParams(scale=1000, sigma=0.8, min_size=1000),
    "lr": 1e-3,
    "iters_per_epoch": 1,
}


def pretrained_backbone(data: dict[str, Path], work: Path, seed: int, epochs: int, otx: bool = False) -> Path:
    """DetCon on the unlabelled images, once per (seed, budget, settings): it does not depend on
    the labelled count. Default settings are `segflow pretrain`'s (auto); ``otx``: OTX's fixed ones."""
    out = work / f"detcon-{seed}-{epochs}{'-otx' if otx else ''}"
    if not out.exists():
        pretrain_stage(
            PretrainConfig(
                images=str(data["unlabeled"]),
                out=str(out),
                model="lite_hrnet_s",
                epochs=epochs,
                batch_size=16,
                seed=seed,
                masks=str(work / ("detcon_mask_otx" if otx else "detcon_mask")),
                **(OTX_PRETRAIN if otx else {}),
            ),
            track=False,
        )
    return out


def run_one(
    data: dict[str, Path],
    work: Path,
    method: str,
    labeled: int,
    seed: int,
    args,
    pretrain_epochs: int = 0,
    backbone: str = "",
) -> float:
    """Train one model and return its test mDice. Methods: supervised, supcon, mean_teacher,
    selfsl (DetCon with the defaults, then supervised), selfsl_otx (DetCon with OTX's fixed settings).
    ``backbone``: start "supervised" from these pretrained weights instead."""
    pretrain_epochs = pretrain_epochs or args.pretrain_epochs
    out = work / f"{method}-{labeled}-{seed}-{pretrain_epochs}{'-' + Path(backbone).name if backbone else ''}"
    selfsl = method.startswith("selfsl")
    if selfsl:
        backbone = str(pretrained_backbone(data, work, seed, pretrain_epochs, otx=method == "selfsl_otx"))
    train_method = "supervised" if selfsl else method
    unlabeled = str(data["unlabeled"]) if method == "mean_teacher" else ""
    cfg = TrainConfig(
        data=str(data["pool"]),
        out=str(out),
        model="lite_hrnet_s",
        epochs=args.epochs,
        batch_size=8,
        input_size=args.size,
        seed=seed,
        max_labeled=labeled,
        iters_per_epoch=args.iters,
        early_stop_patience=args.epochs,
        init_backbone=backbone,
        **method_settings(train_method, unlabeled),
    )
    if cfg.mean_teacher is not None and args.mt_confidence:
        cfg = replace(cfg, mean_teacher=replace(cfg.mean_teacher, confidence=args.mt_confidence))
    train_stage(cfg, track=False)
    evaluation = EvalConfig(model=str(out), data=str(data["test"]), out=str(work / f"eval-{out.name}"))
    metrics = evaluate_stage(evaluation, track=False)
    return metrics.mDice


LINE = re.compile(r"^\s+(\w+)\s+(\d+) labelled, seed (\d+): test mDice ([\d.]+)$")


def reuse_log(path: Path, results: dict, seeds: list[int], reuse_methods: list[str]) -> set[tuple[str, int, int]]:
    """Scores of an earlier run of this script with the same data and settings, from its printed
    lines: those runs are not repeated (for re-measuring one method after a change)."""
    reused = set()
    for line in path.read_text().splitlines():
        match = LINE.match(line)
        if not match or match[1] not in reuse_methods or match[1] not in results:
            continue
        if int(match[2]) in results[match[1]] and int(match[3]) in seeds:
            method, labeled, seed = match[1], int(match[2]), int(match[3])
            results[method][labeled].insert(seeds.index(seed), float(match[4]) / 100)
            reused.add((method, labeled, seed))
    return reused


def mean_std(scores: list[float]) -> tuple[float, float]:
    return statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labeled", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["supervised", "supcon", "mean_teacher", "selfsl"])
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--family", default="street", choices=["street", "indoor"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--iters", type=int, default=10, help="steps per epoch")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out", type=Path, help="also write the raw results as JSON")
    parser.add_argument(
        "--reuse-log",
        type=Path,
        help="the printed output of an earlier run with the same settings: its lines for --reuse methods are kept",
    )
    parser.add_argument("--reuse", nargs="*", default=["supervised", "supcon", "mean_teacher"])
    parser.add_argument("--mt-confidence", type=float, default=0.0, help="Mean Teacher threshold; 0: its default")

    parser.add_argument(
        "--budget",
        type=int,
        nargs="*",
        default=[],
        help="also: self-SL gain over supervised at the first --labeled count, per pretraining epochs, "
        "and the gain with OTX's fixed self-SL settings",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, dict[int, list[float]]] = {m: {n: [] for n in args.labeled} for m in args.methods}
    reused = reuse_log(args.reuse_log, results, args.seeds, args.reuse) if args.reuse_log else set()
    curve: dict[int, list[float]] = {e: [] for e in args.budget}
    otx: list[float] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp), args.size, args.family)
        for labeled in args.labeled:
            for seed in args.seeds:
                for method in args.methods:
                    if (method, labeled, seed) in reused:
                        continue
                    score = run_one(data, Path(tmp), method, labeled, seed, args)
                    results[method][labeled].append(score)
                    print(
                        f"  {method:13s} {labeled:3d} labelled, seed {seed}: test mDice {100 * score:.2f}", flush=True
                    )
        first = args.labeled[0]
        for epochs in args.budget:
            for i, seed in enumerate(args.seeds):
                if epochs == args.pretrain_epochs and "selfsl" in args.methods:
                    score = results["selfsl"][first][i]  # the table's own run
                else:
                    score = run_one(data, Path(tmp), "selfsl", first, seed, args, pretrain_epochs=epochs)
                curve[epochs].append(score)
                print(f"  selfsl, {epochs} pretraining epochs, seed {seed}: test mDice {100 * score:.2f}", flush=True)
        if args.budget:  # the same budget with OTX's fixed settings: what the command line did before "auto"
            for seed in args.seeds:
                score = run_one(data, Path(tmp), "selfsl_otx", first, seed, args)
                otx.append(score)
                print(f"  selfsl_otx {first} labelled, seed {seed}: test mDice {100 * score:.2f}", flush=True)

    print(
        f"\n{args.family} family, lite_hrnet_s, {args.size}px, {args.epochs}x{args.iters} steps, seeds {args.seeds}; "
        f"test mDice % (mean +- std), {time.monotonic() - started:.0f}s"
    )
    header = "method".ljust(14) + "".join(f"{f'{n} labelled':>26s}" for n in args.labeled)
    print(header)
    base = results.get("supervised")
    for method in args.methods:
        cells = []
        for n in args.labeled:
            mean, std = mean_std([100 * s for s in results[method][n]])
            delta = ""
            if base is not None and method != "supervised":
                delta = f" ({mean - 100 * statistics.mean(base[n]):+.1f})"
            cells.append(f"{mean:6.2f} +- {std:4.2f}{delta}".rjust(26))
        print(method.ljust(14) + "".join(cells))
    if args.budget and base is not None:
        n = args.labeled[0]
        print(f"\nself-SL gain over supervised at {n} labelled, by DetCon pretraining epochs (paired by seed):")
        for epochs in args.budget:
            gains = [100 * (a - b) for a, b in zip(curve[epochs], base[n], strict=True)]
            gain, spread = mean_std(gains)
            print(f"  {epochs:4d} epochs: gain {gain:+6.2f} +- {spread:4.2f}")
        gains = [100 * (a - b) for a, b in zip(otx, base[n], strict=True)]
        gain, spread = mean_std(gains)
        print(
            f"  {args.pretrain_epochs:4d} epochs with OTX's fixed settings (scale/min size 1000, lr 1e-3): "
            f"gain {gain:+6.2f} +- {spread:4.2f}"
        )
    if args.out:
        record = {"args": vars(args) | {"out": str(args.out)}, "results": results, "budget": curve, "selfsl_otx": otx}
        args.out.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
