# segflow: two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv from constraints.txt when it is missing (or when the pins change).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
export SEGFLOW_HOME ?= $(CURDIR)/runs
# The main pipeline's default parameters point here (relative to the checkout).
DEMO_DATA := $(CURDIR)/runs/demo/data

.PHONY: test-fast setup demo demo-data demo-adapt test lint format compile bench clean constraints preview

setup: $(STAMP)

# setuptools warns on every editable install ("Editable installation"): the one warning filtered.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# NNCF compiles its fake-quantisation kernels (INT8 export's QAT) on first use: once here instead.
	NNCF_EXTENSION_LOAD_TIMEOUT=0 $(BIN)/python -c "import nncf.torch, nncf.torch.quantization.extensions; nncf.torch.force_build_cpu_extensions()"
	touch $@

# The demo: synthetic target-domain scenes (64 labelled, 96 unlabelled) and source-domain scenes
# (96 labelled, for demo-adapt), then the main pipeline with kfp.local:
# import -> pseudo masks -> DetCon pretraining -> fine-tuning -> evaluation.
demo: $(STAMP) demo-data
	$(BIN)/segflow run pipelines/selfsl_then_finetune.py --local
	@echo "Pictures and metrics of the demo model: the evaluate-model/evaluation/ folder of that run."

demo-data: $(STAMP)
	rm -rf $(DEMO_DATA)
	$(BIN)/segflow data synth $(DEMO_DATA)/target --domain target --num-images 64 --size 96 --seed 1
	$(BIN)/segflow data synth $(DEMO_DATA)/unlabeled --domain target --num-images 96 --size 96 --seed 2 --unlabeled
	$(BIN)/segflow data synth $(DEMO_DATA)/source --domain source --num-images 96 --size 96 --seed 3

# Domain adaptation on the same demo data: "game engine" source -> "camera" target (~3 min on 2 cores).
demo-adapt: $(STAMP)
	test -d $(DEMO_DATA)/source || $(MAKE) demo-data
	$(BIN)/segflow run pipelines/domain_adaptation.py --local
	@echo "The candidates compared: the parent run's comparison/ artifacts in MLflow, and choose-best/ of that run."

# Two worker processes (pytest-xdist) share the cores; each gives torch its share of threads.
# Tests are handed out a few at a time in collection order, the slow ones first (tests/conftest.py),
# so the workers end together; tests marked with one xdist_group run on one worker, which then
# builds their module's fixture (a trained model, an MLflow server) once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadgroup --no-loadscope-reorder --durations=12

# Unit tests only (no pipeline, no training beyond a step): about a minute on 2 cores.
FAST_TESTS = tests/test_lifecycle.py tests/test_engine.py tests/test_cli_options.py tests/test_docs.py \
	tests/test_architecture.py tests/test_synth.py tests/test_models.py tests/test_parallel.py tests/test_results.py
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(FAST_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint images/Dockerfile

format: $(STAMP)
	$(BIN)/ruff check --fix .

compile: $(STAMP)
	mkdir -p build/pipelines
	for f in pipelines/*.py; do $(BIN)/segflow compile $$f --output build/pipelines/$$(basename $$f .py).yaml --overwrite || exit 1; done

bench: $(STAMP)
	$(BIN)/python benchmarks/import_throughput.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/pseudo_masks.py
	$(BIN)/python benchmarks/label_efficiency.py --family street --size 64 --epochs 25 --iters 8 --budget 5 10 20
	$(BIN)/python benchmarks/label_efficiency.py --family indoor --size 64 --epochs 25 --iters 8 --budget 5 10 20
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/domain_adaptation.py

preview: $(STAMP)
	$(BIN)/segflow data preview docs/synthetic_domains.png --size 128 --overwrite
	$(BIN)/segflow data preview docs/indoor_family.png --size 128 --family indoor --overwrite

# Refresh the pins from a clean environment after changing dependencies in pyproject.toml.
constraints:
	rm -rf build/pin-venv && $(PYTHON) -m venv build/pin-venv
	build/pin-venv/bin/pip install --quiet "pip==$(PIP_VERSION)" && build/pin-venv/bin/pip install --quiet -e ".[dev]"
	{ echo "# Exact versions that segflow is tested with; used by make and by images/Dockerfile."; \
	  echo "# Regenerate: make constraints (after changing pyproject.toml)."; \
	  build/pin-venv/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) build runs .pytest_cache .ruff_cache
