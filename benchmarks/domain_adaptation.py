"""Domain adaptation on the built-in synthetic shift: "game engine" source -> "camera" target.

    .venv/bin/python benchmarks/domain_adaptation.py [--seeds 0 1 2] [--size 64] [--iterations 600]
        [--methods ...] [--out FILE.json]
    .venv/bin/python benchmarks/domain_adaptation.py --throughput    # seconds per step, adaptation vs supervised

Per seed:
- source only: lite_hrnet_s trained on labelled source scenes (the OTX recipe);
- each method adapts that model with unlabelled target images for --iterations steps; the
  snapshot is chosen on a small labelled target val subset (as `segflow adapt` does when the
  target is a dataset); "source (+steps)" is the control: the same steps on source batches only;
- MinEnt + AdvEnt: the softmax average of those two;
- target oracle: the same recipe as source only, trained on labelled target scenes;
- target oracle, fine-tuned: the source-only model given the adaptation's steps and optimiser on
  labelled target scenes, the bound of what an adaptation run could reach from the same start.
Every model is scored on a separate target test set (never used for choosing). The table gives
target test mIoU and mDice, mean +- standard deviation over seeds, and the source-only model's
score on source val, the domain gap; then each row's share of target pixels predicted as each
class, under the true shares (a method that pulls the target toward the source's layout shows there).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from train_throughput import synchronize

from segflow.adapt.config import AdaptConfig
from segflow.adapt.selection import CRITERIA, picks
from segflow.data.importer import ImportConfig
from segflow.data.synth import synthesize
from segflow.evaluate.evaluation import EvalConfig
from segflow.stages import adapt_stage, ensemble_stage, evaluate_stage, import_stage, train_stage
from segflow.train.config import TrainConfig

# Published GTA5 -> Cityscapes mIoU (DeepLab-v2, ResNet-101): AdaptSegNet and ADVENT papers, DACS.
PUBLISHED = {
    "source only": 36.6,
    "adaptsegnet single": 41.4,
    "adaptsegnet multi": 42.4,
    "minent": 42.3,
    "advent": 43.8,
    "minent + advent": 45.5,
    "dacs": 52.1,
}
METHODS = [("source", "single"), ("adaptsegnet", "single"), ("adaptsegnet", "multi"), ("minent", "single"),
           ("advent", "single"), ("dacs", "single")]  # fmt: skip


FINE_TUNED = "target oracle, fine-tuned"
ORACLES = ("target oracle", FINE_TUNED)


def label(method: str, levels: str) -> str:
    return {"source": "source (+steps)"}.get(method, f"{method} {levels}" if method == "adaptsegnet" else method)


def build_data(root: Path, size: int, counts: dict[str, int]) -> dict[str, Path]:
    """Disjoint seeds for every set; the target "train" images feed adaptation without labels."""
    synthesize(root / "source_raw", "source", counts["source"], size, seed=200)
    target_pool = root / "target_pool"
    synthesize(target_pool / "train", "target", counts["target"], size, seed=201)
    synthesize(target_pool / "val", "target", counts["target_val"], size, seed=202)
    for p in (target_pool / "val").rglob("target_*.png"):
        p.rename(p.with_name("v" + p.name))
    synthesize(root / "test_raw" / "val", "target", counts["test"], size, seed=203)  # scored only
    data = {"source": root / "source", "target": root / "target", "test": root / "test"}
    import_stage(ImportConfig(str(root / "source_raw"), str(data["source"])), track=False)
    import_stage(ImportConfig(str(target_pool), str(data["target"])), track=False)
    import_stage(ImportConfig(str(root / "test_raw"), str(data["test"])), track=False)
    return data


def score(model: Path, data: Path, work: Path, subset: str = "val") -> dict:
    """mIoU and mDice (%), and the share of the pixels predicted as each class against the share
    that is that class: an adaptation that drags the target's class layout toward the source's
    shows there (RESULTS.md, "Why AdaptSegNet does not gain here")."""
    out = work / f"eval-{model.name}-{data.name}"
    metrics = evaluate_stage(EvalConfig(model=str(model), data=str(data), out=str(out), subset=subset), track=False)
    confusion = [[float(v) for v in row] for row in metrics.confusion_matrix]  # rows: truth, columns: prediction
    pixels = sum(map(sum, confusion)) or 1.0
    predicted = [sum(column) / pixels for column in zip(*confusion, strict=True)]
    truth = [sum(row) / pixels for row in confusion]
    return {
        "mIoU": 100 * metrics.mIoU,
        "mDice": 100 * metrics.mDice,
        "predicted": dict(zip(metrics.labels, predicted, strict=True)),
        "truth": dict(zip(metrics.labels, truth, strict=True)),
    }


def supervised(data: Path, out: Path, seed: int, args) -> Path:
    train_stage(
        TrainConfig(
            data=str(data),
            out=str(out),
            input_size=args.size,
            batch_size=8,
            epochs=args.epochs,
            iters_per_epoch=args.iters,
            early_stop_patience=args.epochs,
            seed=seed,
        ),
        track=False,
    )
    return out


def snapshot_choice(model: Path) -> dict:
    """Target val mIoU (%) of the snapshot each label-free criterion picks, and the oracle's."""
    history = json.loads((model / "training.json").read_text())["history"]
    return {name: 100 * p["score"] for name, p in picks(history).items()}


def adapted(data: dict, init: Path, work: Path, method: str, levels: str, seed: int, args) -> Path:
    out = work / f"{method}-{levels}-{seed}"
    cfg = AdaptConfig(
        source=str(data["source"]),
        target=str(data["target"]),
        init=str(init),
        out=str(out),
        method=method,
        levels=levels,
        iterations=args.iterations,
        eval_every=args.eval_every,
        input_size=args.size,
        batch_size=8,
        seed=seed,
        **json.loads(args.settings),
    )
    adapt_stage(cfg, track=False)
    return out


def run(args) -> dict:
    counts = {"source": args.source_images, "target": args.target_images, "target_val": 16, "test": 48}
    results: dict[str, list[dict]] = {}
    choices: dict[str, list[dict]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = build_data(work, args.size, counts)
        for seed in args.seeds:
            init = supervised(data["source"], work / f"source-only-{seed}", seed, args)
            rows = {"source only": score(init, data["test"], work)}
            rows["source only, on source val"] = score(init, data["source"], work)
            for method, levels in args.methods:
                model = adapted(data, init, work, method, levels, seed, args)
                rows[label(method, levels)] = score(model, data["test"], work)
                choices.setdefault(label(method, levels), []).append(snapshot_choice(model))
                print(f"  seed {seed} {label(method, levels):20s} {rows[label(method, levels)]}", flush=True)
            if {("minent", "single"), ("advent", "single")} <= set(args.methods):
                members = [str(work / f"{m}-single-{seed}") for m in ("minent", "advent")]
                ensemble_stage(members, str(work / f"ensemble-{seed}"), track=False)
                rows["minent + advent"] = score(work / f"ensemble-{seed}", data["test"], work)
            if not args.no_oracle:
                oracle = supervised(data["target"], work / f"oracle-{seed}", seed, args)
                rows["target oracle"] = score(oracle, data["test"], work)
                # The adaptation step's own bound: the source model, the same steps and optimiser,
                # with the target's labels (the control's recipe on labelled target batches).
                labelled_target = {**data, "source": data["target"]}
                tuned = adapted(labelled_target, init, work / "fine-tuned", "source", "single", seed, args)
                rows[FINE_TUNED] = score(tuned, data["test"], work / "fine-tuned")
            for name, row in rows.items():
                results.setdefault(name, []).append(row)
            print(f"seed {seed} done ({time.monotonic() - started:.0f} s)", flush=True)
    results["snapshot choice"] = choices  # type: ignore[assignment]
    return results


def report(results: dict[str, list[dict]], args) -> None:
    def mean_std(name: str, key: str) -> tuple[float, float]:
        values = [r[key] for r in results[name]]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    print(
        f"\nlite_hrnet_s, {args.size} px, source-only {args.epochs}x{args.iters} steps, adaptation "
        f"{args.iterations} steps; target test set, seeds {args.seeds}: mean +- std"
    )
    results = dict(results)  # the caller writes them out after the report: leave its dict whole
    choices = results.pop("snapshot choice", {})
    print(f"{'':30s} {'mIoU %':>16s} {'mDice %':>16s} {'vs source only':>15s} {'published mIoU':>15s}")
    base = mean_std("source only", "mIoU")[0]
    for name in results:
        iou, iou_sd = mean_std(name, "mIoU")
        dice, dice_sd = mean_std(name, "mDice")
        delta = "" if name == "source only" or "source val" in name else f"{iou - base:+.1f}"
        published = PUBLISHED.get(name, "")
        print(f"{name:30s} {iou:8.2f} +- {iou_sd:4.2f} {dice:8.2f} +- {dice_sd:4.2f} {delta:>15s} {published!s:>15s}")
    methods = [n for n in results if n not in ORACLES and "source only" not in n]
    for oracle in (o for o in ORACLES if o in results and methods):
        gap = mean_std(oracle, "mIoU")[0] - base
        best = max((mean_std(n, "mIoU")[0], n) for n in methods)
        print(f"source-only -> {oracle} gap {gap:.1f} mIoU points; the best method ({best[1]}) closes "
              f"{100 * (best[0] - base) / gap:.0f}% of it")  # fmt: skip
    src = mean_std("source only, on source val", "mIoU")[0]
    print(f"domain gap of the source-only model: {src:.1f} mIoU on source val, {base:.1f} on the target test set "
          f"({src - base:.1f} points)")  # fmt: skip
    class_shares(results)
    snapshot_table(choices)


def snapshot_table(choices: dict[str, list[dict]]) -> None:
    """Per method, the target val mIoU of the snapshot each rule picks (mean over seeds), and the gap
    to the oracle's pick (what the labels would have chosen)."""
    if not choices:
        return
    rules = ["oracle", *CRITERIA]
    print("\nsnapshot choice: target val mIoU % of each rule's pick, mean over seeds (gap to the oracle)")
    print(f"{'':22s} " + " ".join(f"{r:>16s}" for r in rules))
    for method, runs in choices.items():
        oracle = statistics.mean(r["oracle"] for r in runs)
        means = [statistics.mean(r[rule] for r in runs) for rule in rules]
        cells = [f"{m:8.2f} ({m - oracle:+5.2f})" for m in means]
        print(f"{method:22s} " + " ".join(f"{c:>16s}" for c in cells))


def class_shares(results: dict[str, list[dict]]) -> None:
    """Per row, the share of target test pixels predicted as each class (mean over seeds), under
    the true shares of the target test set and of the source val set."""
    rows = {name: runs for name, runs in results.items() if all("predicted" in r for r in runs)}
    if "source only" not in rows:
        return  # results saved before the shares were recorded
    classes = list(rows["source only"][0]["truth"])
    print(f"\nshare of pixels per class (%), mean over seeds\n{'':30s} " + " ".join(f"{c[:10]:>10s}" for c in classes))
    truths = {"truth, target test": rows["source only"], "truth, source val": rows.get("source only, on source val")}
    lines = [(name, runs, "truth") for name, runs in truths.items() if runs]
    lines += [(name, runs, "predicted") for name, runs in rows.items() if "source val" not in name]
    for name, runs, key in lines:
        shares = [statistics.mean(r[key][c] for r in runs) for c in classes]
        print(f"{name:30s} " + " ".join(f"{100 * v:10.1f}" for v in shares))


def throughput(args) -> dict[str, float]:
    """Seconds per step of each method beside a plain supervised step, same batches, same process."""
    import torch

    from segflow.adapt.objectives import make_objective
    from segflow.data.datasets import Normalization
    from segflow.models import create_model
    from segflow.train.distributed import Dist, autocast_for
    from segflow.train.loop import train_step
    from segflow.train.objective import MAIN, Objective, Part, Recipe, Step, Stream

    torch.set_num_threads(args.threads)
    size, batch = args.size, 8
    dist = Dist().start()
    autocast, scaler = autocast_for(args.amp, dist.device)
    device = dist.device
    source = {
        "image": torch.randn(batch, 3, size, size, device=device),
        "mask": torch.randint(0, 7, (batch, size, size), device=device),
    }
    target = {"image": torch.randn(batch, 3, size, size, device=device)}
    rows = {}
    for method, levels in [("supervised", "single"), *args.methods]:
        torch.manual_seed(0)
        multi = levels == "multi"
        model = create_model("lite_hrnet_s", 7, aux=multi)
        if method == "supervised":
            objective = Objective()
        else:
            settings = {"method": method, "levels": levels, "input_size": size, **json.loads(args.settings)}
            cfg = AdaptConfig("-", "-", "-", "-", **settings)
            objective = make_objective(cfg, 7, Stream(None, batch), Normalization([128.0] * 3, [64.0] * 3))
        model.to(device)
        objective.setup(model, device)
        parts = [Part(MAIN, list(model.parameters()) + objective.external_params(), Recipe(clip_norm=40.0))]
        parts += objective.parts()
        batch_dict = {**source, "target": target}
        times = []
        for i in range(args.steps + 2):
            start = time.perf_counter()
            train_step(model, objective, parts, batch_dict, Step(0, i, 0, 100), autocast, scaler, dist)
            synchronize(device)
            times.append(time.perf_counter() - start)
        rows[label(method, levels) if method != "supervised" else "supervised step"] = statistics.median(times[2:])
    base = rows["supervised step"]
    print(f"seconds per step on {device.type} (amp {args.amp}), lite_hrnet_s, {size} px, batch {batch} "
          f"(+{batch} target), {args.threads} threads, settings {args.settings}")  # fmt: skip
    for name, seconds in rows.items():
        print(f"  {name:22s} {seconds:7.3f} s   x{seconds / base:5.2f} of a supervised step")
    return rows


def merged(files: list[Path], args) -> dict[str, list[dict]]:
    """The results of several runs (seeds run side by side, one process each) as one; ``args``
    takes the runs' settings for the table's header."""
    results: dict[str, list[dict]] = {}
    args.seeds = []
    for file in files:
        saved = json.loads(file.read_text())
        args.seeds += json.loads(saved["args"]["seeds"])
        for key in ("size", "epochs", "iters", "iterations"):
            setattr(args, key, int(saved["args"][key]))
        for name, rows in saved["results"].items():
            if name == "snapshot choice":  # one list per method
                for method, runs in rows.items():
                    results.setdefault(name, {}).setdefault(method, []).extend(runs)  # type: ignore[union-attr]
            else:
                results.setdefault(name, []).extend(rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--source-images", type=int, default=96)
    parser.add_argument("--target-images", type=int, default=96)
    # 1000 source-only steps: with 200 the model is still learning the source (33 mIoU on source val),
    # so every adaptation step mostly continues source training and the domain gap reads small.
    parser.add_argument("--epochs", type=int, default=50, help="source-only and oracle epochs")
    parser.add_argument("--iters", type=int, default=20, help="steps per epoch of source-only and oracle")
    parser.add_argument("--iterations", type=int, default=600, help="adaptation steps")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--settings", default="{}", help="AdaptConfig fields as JSON, e.g. '{\"lr\": 1e-4}'")
    parser.add_argument("--methods", nargs="+", default=[f"{m}:{lv}" for m, lv in METHODS])
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="--throughput: timed steps per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", default="off", help="--throughput: off, bf16, fp16 or auto")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", help="print one table from --out files (one seed each)")
    args = parser.parse_args()
    args.methods = [tuple(m.split(":")) if ":" in m else (m, "single") for m in args.methods]
    logging.basicConfig(level=logging.WARNING)
    if args.throughput:
        throughput(args)
        return
    if args.merge:
        results = merged(args.merge, args)
        report(results, args)
        return
    import torch

    torch.set_num_threads(args.threads)
    results = run(args)
    report(results, args)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
