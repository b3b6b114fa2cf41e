# blendsign: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= data/demo
PRESET ?= demo

.PHONY: setup demo test lint bench clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/blendsign synth $(DEMO)/source --config $(PRESET)
	$(BIN)/blendsign ingest $(DEMO)/source/dicom $(DEMO)/ingest --config $(PRESET) --workers 2
	$(BIN)/blendsign fuse $(DEMO)/source/annotations.csv $(DEMO)/ingest $(DEMO)/labels --config $(PRESET)
	$(BIN)/blendsign folds $(DEMO)/labels $(DEMO)/folds --config $(PRESET)
	$(BIN)/blendsign train --config $(PRESET) --ingest $(DEMO)/ingest --labels $(DEMO)/labels \
		--folds $(DEMO)/folds --fold 0 --out $(DEMO)/train/fold0
	@echo
	@echo "Demo output under $(DEMO)/: source/ (synthetic DICOM + annotations), ingest/ (Parquet slices),"
	@echo "labels/ (gold labels, reader agreement), folds/, train/fold0/ (teacher checkpoints)."
	@echo "MLflow: .blendsign/mlflow.db — browse with: $(BIN)/mlflow ui --backend-store-uri sqlite:///.blendsign/mlflow.db"
	@cat $(DEMO)/ingest/ingest_report.md $(DEMO)/labels/agreement.md $(DEMO)/folds/folds.md

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_train.py

clean-demo:
	rm -rf $(DEMO) data/demo*.pseudonym-key
