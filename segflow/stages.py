"""Each pipeline stage as one call: the work plus its MLflow run.

The CLI, the KFP components and the tests all call these, so a stage behaves the same on a
laptop and in a cluster.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

from segflow import tracking
from segflow.data import manifest as manifest_lib
from segflow.data.importer import ImportConfig, import_dataset
from segflow.errors import SegflowError
from segflow.evaluate.evaluation import EvalConfig, render_markdown, run_evaluation
from segflow.storage import is_s3, local_input, staged_output
from segflow.train.config import TrainConfig


def import_stage(
    cfg: ImportConfig, run: tracking.RunContext | None = None, markdown_out: str | None = None, track: bool = True
) -> dict:
    """Import and validate a dataset; log config, fingerprint, counts and the report to MLflow.

    ``markdown_out``: also write the report there as one self-contained Markdown file (plot
    inlined), which is what the KFP UI can show.
    """
    if not track:
        report = import_dataset(cfg)
        _write_markdown(report, markdown_out)
        return report
    label = str(cfg.source).rstrip("/").rsplit("/", 1)[-1]
    with tracking.stage_run("import", cfg, run, label=label) as active:
        report = import_dataset(cfg)
        import mlflow

        mlflow.set_tag(tracking.FINGERPRINT_TAG, report["fingerprint"])
        mlflow.log_metrics({f"images_{name}": n for name, n in report["counts"].items()})
        mlflow.log_metrics({"labels": len(report["labels"]), "warnings": len(report["warnings"])})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            plot = manifest_lib.plot_class_distribution(report, folder / "class_distribution.png")
            (folder / "report.md").write_text(manifest_lib.render_markdown(report, plot))
            mlflow.log_dict(report, "report.json")
            mlflow.log_artifacts(tmp)
            report["mlflow_run_id"] = active.info.run_id
            _write_markdown(report, markdown_out, plot)
    return report


def _write_markdown(report: dict, path: str | None, plot: Path | None = None) -> None:
    if not path:
        return
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot if plot and plot.exists() else manifest_lib.plot_class_distribution(report, Path(tmp) / "p.png")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(manifest_lib.render_markdown(report, plot, embed_plot=True))


def train_stage(cfg: TrainConfig, run: tracking.RunContext | None = None, track: bool = True) -> dict:
    """Train a model; per-epoch metrics, the summary and the model's config go to MLflow."""
    from segflow.train.engine import train

    if not track:
        return train(cfg)
    method = "supcon" if cfg.supcon else "mean_teacher" if cfg.mean_teacher else "supervised"
    with tracking.stage_run("train", cfg, run, label=f"{cfg.model} {method}") as active:
        import mlflow

        summary = train(cfg, on_epoch=lambda epoch, record: mlflow.log_metrics(record, step=epoch + 1))
        mlflow.set_tag(tracking.FINGERPRINT_TAG, summary["dataset_fingerprint"])
        mlflow.log_metrics({"best_val_mDice": summary["best_val_mDice"], "best_epoch": summary["best_epoch"]})
        mlflow.log_dict({k: v for k, v in summary.items() if k != "config"}, "training.json")
        summary["mlflow_run_id"] = active.info.run_id
    return summary


def evaluate_stage(
    cfg: EvalConfig, run: tracking.RunContext | None = None, markdown_out: str | None = None, track: bool = True
) -> dict:
    """Evaluate a model; metrics, per-class scores and pictures go to MLflow.

    ``markdown_out``: also write the report with its pictures inlined (for the KFP UI).
    """
    with tracking.stage_run("evaluate", cfg, run, label=cfg.subset) if track else nullcontext() as active:
        metrics = run_evaluation(cfg)
        with local_input(cfg.out, "evaluation output") as folder:
            if markdown_out:
                Path(markdown_out).parent.mkdir(parents=True, exist_ok=True)
                has_pictures = (folder / "predictions.png").exists()
                Path(markdown_out).write_text(render_markdown(metrics, has_pictures, embed_dir=folder))
            if track:
                import mlflow

                mlflow.set_tag(tracking.FINGERPRINT_TAG, metrics["dataset_fingerprint"])
                mlflow.log_metrics({k: metrics[k] for k in ("mDice", "mIoU", "pixel_accuracy")})
                per_class = metrics["per_class"].items()
                mlflow.log_metrics({f"dice_{name}": v["dice"] for name, v in per_class if v["dice"] is not None})
                mlflow.log_artifacts(str(folder))
                metrics["mlflow_run_id"] = active.info.run_id
    return metrics


def pseudo_masks_stage(
    images: str,
    out: str = "",
    params=None,
    workers: int = 0,
    run: tracking.RunContext | None = None,
    track: bool = True,
) -> dict:
    """Felzenszwalb pseudo masks for a folder of images (local, or s3:// with OUT given)."""
    from segflow.selfsl.pseudo_masks import FelzenszwalbParams, make_pseudo_masks

    params = params or FelzenszwalbParams()

    def work() -> dict:
        if not is_s3(images) and not is_s3(out):
            return make_pseudo_masks(Path(images), Path(out) if out else None, params, workers)
        if not out:
            raise SegflowError("pseudo masks of s3:// images need --out (a local folder or s3:// prefix).")
        with local_input(images, "IMAGES") as folder, staged_output(out, overwrite=True) as stage:
            return make_pseudo_masks(folder, stage, params, workers) | {"out": out}

    if not track:
        return work()
    with tracking.stage_run("pseudo_masks", {"images": images, "out": out, **params.__dict__}, run):
        import mlflow

        result = work()
        mlflow.log_metrics({"images": result["images"], "made": result["made"], "reused": result["reused"]})
    return result


def pretrain_stage(cfg, run: tracking.RunContext | None = None, track: bool = True) -> dict:
    """DetCon pretraining; per-epoch loss to MLflow."""
    from segflow.selfsl.detcon import pretrain

    if not track:
        return pretrain(cfg)
    with tracking.stage_run("pretrain", cfg, run, label=f"{cfg.model} detcon"):
        import mlflow

        result = pretrain(cfg, on_epoch=lambda epoch, record: mlflow.log_metrics(record, step=epoch + 1))
        mlflow.log_metrics({"final_loss": result["final_loss"]})
    return result


def export_stage(cfg, run: tracking.RunContext | None = None, track: bool = True) -> dict:
    """OpenVINO export with its parity check; the IR is logged to MLflow as a pyfunc model."""
    from segflow.export.openvino_ir import export

    if not track:
        return export(cfg)
    with tracking.stage_run("export", cfg, run, label=cfg.precision):
        import mlflow

        from segflow.export.pyfunc import log_ir

        report = export(cfg)
        mlflow.log_metrics(
            {k: float(v) for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
        mlflow.log_dict(report, "export_report.json")
        with local_input(cfg.out, "export output") as ir_dir:
            report["model_uri"] = log_ir(str(ir_dir))
    return report
