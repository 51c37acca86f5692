"""Export a trained model to OpenVINO IR, checked against PyTorch; the IR is logged to MLflow."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from segflow_kfp import SEGFLOW_IMAGE


@dsl.component(base_image=SEGFLOW_IMAGE, install_kfp_package=False)
def export_model(
    model: Input[Model],
    dataset: Input[Dataset],
    ir: Output[Model],
    metrics: Output[Metrics],
    precision: str = "fp32",
    max_drop: float = 1.0,
    int8_scheme: str = "auto",
    run_key: str = "",
    run_name: str = "",
    experiment: str = "",
):
    """PRECISION: fp32, fp16 or int8 (calibrated on DATASET; INT8_SCHEME as `segflow export`). Fails when
    the IR disagrees with PyTorch."""
    from segflow.export.openvino_ir import ExportConfig
    from segflow.stages import export_stage, log_metrics_to
    from segflow.tracking import RunContext

    cfg = ExportConfig(
        model=model.path,
        out=ir.path,
        precision=precision,
        calibration=dataset.path,
        max_drop=max_drop,
        int8_scheme=int8_scheme,
        overwrite=True,
    )
    report = export_stage(cfg, RunContext(run_key, run_name, experiment))
    ir.metadata.update(
        {
            "framework": "openvino",
            "precision": precision,
            "latency_ms": report.latency_ms,
            "throughput_vs_fp32": report.throughput_vs_fp32,
            "int8_scheme": report.int8_scheme,
            "mDice": report.ir_mDice,
            "torch_mDice": report.torch_mDice,
            "max_abs_logit_diff": report.max_abs_logit_diff,
            "parity_passed": report.passed,
            "mlflow_model_uri": report.model_uri,
            "mlflow_model_id": report.model_id,
        }
    )
    log_metrics_to(metrics, report.metrics)
