"""Import and validate a segmentation dataset (any Datumaro format) into a dataset artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output

from segflow_kfp import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def import_data(
    source_uri: str,
    dataset: Output[Dataset],
    report: Output[Markdown],
    metrics: Output[Metrics],
    data_format: str = "",
    val_fraction: float = 0.2,
    seed: int = 0,
    ignore_labels: str = "",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """Read SOURCE_URI (local path or s3://), validate every item, write the artifact.
    ``ignore_labels``: comma-separated classes read as "ignore" (255), e.g. void."""
    from segflow.data.importer import ImportConfig
    from segflow.stages import import_stage, log_metrics_to
    from segflow.tracking import RunContext

    cfg = ImportConfig(
        source=source_uri,
        out=dataset.path,
        format=data_format or None,
        val_fraction=val_fraction,
        seed=seed,
        ignore_labels=tuple(n.strip() for n in ignore_labels.split(",") if n.strip()),
    )
    result = import_stage(cfg, RunContext(run_key, run_name, experiment), markdown_out=report.path)
    dataset.metadata.update(
        {
            "fingerprint": result.fingerprint,
            "labels": result.labels,
            "counts": result.counts,
            "source": source_uri,
        }
    )
    log_metrics_to(metrics, result.metrics)
