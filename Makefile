# blendsign: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= data/demo
PRESET ?= demo
# what the demo registers: the fold ensemble (no retraining); `make demo REGISTER=refit` trains the refit too
REGISTER ?= fold-ensemble

.PHONY: setup demo test lint bench clean-demo mlflow-server mlflow-ui

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/blendsign pipeline run --local --config $(PRESET) --work $(DEMO) --register $(REGISTER)
	@echo
	@echo "Demo output under $(DEMO)/: source/ (synthetic DICOM + annotations) and kfp/<run>/<step>/ (each"
	@echo "pipeline step's artifacts: ingest/dataset, fuse/labels, folds/split, the fold models,"
	@echo "evaluate/cv/evaluation with the report and figures, register/model with the model card)."
	@echo "Browse the runs and the registry: make mlflow-ui"

mlflow-server: $(STAMP)
	BIN=$(BIN) mlflow/server.sh

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$(CURDIR)/.blendsign/mlflow.db

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks components pipelines docker

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_serve.py

clean-demo:
	rm -rf $(DEMO) data/demo*.pseudonym-key
