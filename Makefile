# blendsign: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= data/demo
PRESET ?= demo
# what the demo registers: the fold ensemble (no retraining); `make demo REGISTER=refit` trains the refit too
REGISTER ?= fold-ensemble

.PHONY: setup demo test lint browser pipelines bench clean-demo mlflow-server mlflow-ui

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/blendsign pipeline run --local --config $(PRESET) --work $(DEMO) --register $(REGISTER)
	@echo
	@echo "Demo output under $(DEMO)/: source/ (synthetic DICOM + annotations), kfp/<run>/<step>/ (each"
	@echo "pipeline step's artifacts: ingest/dataset, fuse/labels, folds/split, the fold models,"
	@echo "evaluate/cv/evaluation with report.html and the figures, register/card: the model card) and"
	@echo "runs/<run id>/ (the training jobs' checkpoints and final models). Browse the runs and the registry:"
	@echo "make mlflow-ui"

# The committed pipeline specs (default profile, paper preset): upload one in the Kubeflow UI.
pipelines: $(STAMP)
	env -u BLENDSIGN_IMAGE -u BLENDSIGN_CPU_IMAGE $(BIN)/blendsign pipeline compile --backend current \
		--output pipelines/blendsign_pipeline.yaml
	env -u BLENDSIGN_IMAGE -u BLENDSIGN_CPU_IMAGE $(BIN)/blendsign pipeline compile --backend compat \
		--output pipelines/blendsign_pipeline_kfp2.5.yaml

mlflow-server: $(STAMP)
	BIN=$(BIN) mlflow/server.sh

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$(CURDIR)/.blendsign/mlflow.db

# ruff, then mypy ([tool.mypy] in pyproject.toml; its cache, .mypy_cache/, makes a rerun fast)
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks components pipelines docker
	$(BIN)/mypy

# Debian's chromium for the HTML report's screenshot test, if absent and installable (root, apt-get); never fails
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the HTML screenshot test will be skipped"; }

# every core, one test module per worker (module fixtures such as the kfp.local run are made once); OpenMP
# threads sleep instead of spinning while the two workers share the cores
test: $(STAMP) lint browser
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_serve.py

clean-demo:
	rm -rf $(DEMO) data/demo*.pseudonym-key
