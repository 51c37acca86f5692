"""Each pipeline stage as one call: the work plus its MLflow run.

The CLI, the KFP components and the tests all call these, so a stage behaves the same on a
laptop and in a cluster.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from segflow import tracking
from segflow.data import manifest as manifest_lib
from segflow.data.importer import ImportConfig, import_dataset


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
