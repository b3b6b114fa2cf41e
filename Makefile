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
	@echo
	@echo "Demo output under $(DEMO)/: source/ (synthetic DICOM + annotations), ingest/ (Parquet slices + report)"
	@cat $(DEMO)/ingest/ingest_report.md

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py

clean-demo:
	rm -rf $(DEMO) $(DEMO).pseudonym-key data/demo/*.pseudonym-key
