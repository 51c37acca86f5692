"""Import and validate a labelled source-domain dataset and a labelled target-domain dataset.

segflow run pipelines/prepare_data.py --local
segflow compile pipelines/prepare_data.py --output prepare_data.yaml
"""

from kfp import dsl

from segflow_kfp.data_import import import_data
from segflow_kfp.platform import on_cluster
from segflow_kfp.tracking import tracked


@dsl.pipeline(name="prepare-data", description="Import and validate source and target datasets.")
def prepare_data(
    source_uri: str = "runs/demo/data/source",
    target_uri: str = "runs/demo/data/target",
    val_fraction: float = 0.2,
    seed: int = 0,
    experiment: str = "",
):
    track, exit_handler = tracked(experiment, "prepare-data", locals())
    with exit_handler:
        for name, uri in (("source", source_uri), ("target", target_uri)):
            task = import_data(source_uri=uri, val_fraction=val_fraction, seed=seed, **track)
            on_cluster(task.set_display_name(f"import-{name}"), cache=False)
