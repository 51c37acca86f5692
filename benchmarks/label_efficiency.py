"""Label efficiency: plain supervised vs SupCon vs Mean Teacher vs DetCon self-SL then supervised,
with 8, 16 and 24 labelled images.

    .venv/bin/python benchmarks/label_efficiency.py [--labeled 8 16 24] [--seeds 0 1 2]
        [--methods supervised supcon mean_teacher selfsl] [--epochs 30] [--iters 10] [--size 96] [--out FILE.json]

All on synthetic target-domain scenes (the camera look):
- a labelled pool (the first N train images are used) with its own 16-image val subset, used
  only to pick the best epoch;
- a separate 48-image test set, on which every model is scored;
- 96 unlabelled images for Mean Teacher and for DetCon pretraining (the labelled pool's images
  are not among them). "selfsl" pretrains the backbone with DetCon on them once per seed
  (pseudo masks with Felzenszwalb scale 100 / min size 40, sized for 96 px images), then
  fine-tunes exactly like "supervised".

Every method gets the same data, seeds, model (lite_hrnet_s), and step budget
(epochs x iters per epoch). The table shows the mean and standard deviation of test mDice
(percent) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from segflow.data.importer import ImportConfig
from segflow.data.synth import synthesize
from segflow.evaluate.evaluation import EvalConfig
from segflow.selfsl.detcon import PretrainConfig
from segflow.selfsl.pseudo_masks import FelzenszwalbParams
from segflow.stages import detcon_stage, evaluate_stage, import_stage, train_stage
from segflow.train.config import TrainConfig, method_settings


def build_data(root: Path, size: int) -> dict[str, Path]:
    """Labelled pool (train 24 + val 16), test set (48), unlabelled images (96): disjoint seeds."""
    pool = root / "pool_raw"
    synthesize(pool / "train", "target", 24, size, seed=100)
    synthesize(pool / "val", "target", 16, size, seed=101)
    for p in (pool / "val").rglob("target_*.png"):  # distinct names from the train images
        p.rename(p.with_name("v" + p.name))
    synthesize(root / "test_raw" / "val", "target", 48, size, seed=102)  # a val subset only: all 48 scored
    unlabeled = synthesize(root / "unlabeled", "target", 96, size, seed=103, unlabeled=True)
    import_stage(ImportConfig(str(pool), str(root / "pool")), track=False)
    import_stage(ImportConfig(str(root / "test_raw"), str(root / "test")), track=False)
    return {"pool": root / "pool", "test": root / "test", "unlabeled": unlabeled}


def pretrained_backbone(data: dict[str, Path], work: Path, seed: int, args) -> Path:
    """DetCon on the unlabelled images, once per seed (it does not depend on the labelled count)."""
    out = work / f"detcon-{seed}"
    if not out.exists():
        detcon_stage(
            PretrainConfig(
                images=str(data["unlabeled"]),
                out=str(out),
                model="lite_hrnet_s",
                epochs=args.pretrain_epochs,
                batch_size=16,
                input_size=args.size,
                seed=seed,
                lr=args.pretrain_lr,
                masks=str(work / "detcon_mask"),
                felzenszwalb=FelzenszwalbParams(scale=100, sigma=0.8, min_size=40),
            ),
            track=False,
        )
    return out


def run_one(data: dict[str, Path], work: Path, method: str, labeled: int, seed: int, args) -> float:
    out = work / f"{method}-{labeled}-{seed}"
    backbone = str(pretrained_backbone(data, work, seed, args)) if method == "selfsl" else ""
    train_method = "supervised" if method == "selfsl" else method
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
    train_stage(cfg, track=False)
    evaluation = EvalConfig(model=str(out), data=str(data["test"]), out=str(work / f"eval-{out.name}"))
    metrics = evaluate_stage(evaluation, track=False)
    return metrics["mDice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labeled", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["supervised", "supcon", "mean_teacher", "selfsl"])
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--pretrain-lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--iters", type=int, default=10, help="steps per epoch")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out", type=Path, help="also write the raw results as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, dict[int, list[float]]] = {m: {n: [] for n in args.labeled} for m in args.methods}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp), args.size)
        for labeled in args.labeled:
            for seed in args.seeds:
                for method in args.methods:
                    score = run_one(data, Path(tmp), method, labeled, seed, args)
                    results[method][labeled].append(score)
                    print(
                        f"  {method:13s} {labeled:3d} labelled, seed {seed}: test mDice {100 * score:.2f}", flush=True
                    )

    print(
        f"\nlite_hrnet_s, {args.size}px, {args.epochs}x{args.iters} steps, seeds {args.seeds}; "
        f"test mDice % (mean +- std), {time.monotonic() - started:.0f}s"
    )
    header = "method".ljust(14) + "".join(f"{f'{n} labelled':>26s}" for n in args.labeled)
    print(header)
    base = results.get("supervised")
    for method in args.methods:
        cells = []
        for n in args.labeled:
            scores = [100 * s for s in results[method][n]]
            mean = statistics.mean(scores)
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            delta = ""
            if base is not None and method != "supervised":
                delta = f" ({mean - 100 * statistics.mean(base[n]):+.1f})"
            cells.append(f"{mean:6.2f} +- {std:4.2f}{delta}".rjust(26))
        print(method.ljust(14) + "".join(cells))
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
