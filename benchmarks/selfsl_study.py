"""What DetCon's gain depends on, on one family: pseudo-mask granularity (segments per image) and
any other pretraining setting.

    .venv/bin/python benchmarks/selfsl_study.py [--family street|indoor] [--mask-scales 0.5 1 2 4]
        [--settings '{"ema_momentum": 0.99}' ...] [--labeled 8] [--seeds 0 1 2] [--pretrain-epochs 20]
        [--epochs 25] [--iters 8] [--size 64]

The data, training and scoring are benchmarks/label_efficiency.py's. Each variant pretrains with
DetCon on the 96 unlabelled images with every setting at its default ("auto") except:
- ``--mask-scales K``: the Felzenszwalb scale and minimum size are the size rule's values times K
  (K = 1 is the default; larger K, fewer and larger segments);
- ``--settings JSON``: these PretrainConfig fields (masks at the default rule).
It then fine-tunes like "supervised"; the gain over supervised is paired by seed. The median
segments per image of each variant's masks are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from label_efficiency import build_data, mean_std, run_one

from segflow.data.datasets import image_files
from segflow.selfsl.config import PretrainConfig
from segflow.selfsl.pseudo_masks import FelzenszwalbParams, median_side, size_rule
from segflow.stages import pretrain_stage


def scaled_rule(images: Path, k: float) -> FelzenszwalbParams:
    rule = size_rule(median_side(image_files(images)))
    return FelzenszwalbParams(scale=rule.scale * k, sigma=rule.sigma, min_size=max(1, round(rule.min_size * k)))


def pretrain_variant(data: dict, work: Path, seed: int, epochs: int, k: float, name: str, settings: dict):
    """DetCon with masks at K times the size rule and ``settings``; returns the backbone and
    segments per image."""
    out = work / f"detcon-{name}-{seed}"
    result = pretrain_stage(
        PretrainConfig(
            images=str(data["unlabeled"]),
            out=str(out),
            epochs=epochs,
            batch_size=16,
            seed=seed,
            masks=str(work / f"masks-k{k:g}"),
            felzenszwalb=scaled_rule(data["unlabeled"], k),
            **settings,
        ),
        track=False,
    )
    return out, result.pseudo_masks.get("segments_per_image", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="street", choices=["street", "indoor"])
    parser.add_argument("--mask-scales", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--settings", nargs="*", default=[], help="PretrainConfig fields as JSON, one variant each")
    parser.add_argument("--labeled", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = build_data(work, args.size, args.family)
        base = [run_one(data, work, "supervised", args.labeled, seed, args) for seed in args.seeds]
        print(f"  supervised: {' '.join(f'{100 * s:.2f}' for s in base)}", flush=True)
        rows = []
        variants = [(f"K {k:g}", k, {}) for k in args.mask_scales]
        variants += [(text, 1.0, json.loads(text)) for text in args.settings]
        for i, (name, k, settings) in enumerate(variants):
            scores, segments = [], []
            for seed in args.seeds:
                backbone, count = pretrain_variant(data, work, seed, args.pretrain_epochs, k, str(i), settings)
                segments.append(count)
                scores.append(run_one(data, work, "supervised", args.labeled, seed, args, backbone=str(backbone)))
            gains = [100 * (a - b) for a, b in zip(scores, base, strict=True)]
            rows.append((name, statistics.median(segments), *mean_std([100 * s for s in scores]), *mean_std(gains)))
            print(f"  {name}: {' '.join(f'{100 * s:.2f}' for s in scores)}", flush=True)
    print(
        f"\n{args.family} family, {args.labeled} labelled, {args.size}px, DetCon {args.pretrain_epochs} epochs, "
        f"seeds {args.seeds}; test mDice %, {time.monotonic() - started:.0f}s"
    )
    sup_mean, sup_std = mean_std([100 * s for s in base])
    print(f"supervised                       {sup_mean:6.2f} +- {sup_std:4.2f}")
    for name, segments, mean, std, gain, spread in rows:
        print(f"{name:24s} ({segments:5.1f} segments)  {mean:6.2f} +- {std:4.2f}   gain {gain:+6.2f} +- {spread:4.2f}")


if __name__ == "__main__":
    main()
