# The verbs people use. Every target that needs Python creates the project's
# virtual environment (.venv) first if it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install run test smoke sweep bench clean

install: $(STAMP)

# pip resolves torch and torchvision like any other dependency; on machines with
# a local wheel store and a pip constraint (such as this project's CI) that is a
# local install, elsewhere a download.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Train the default configuration (CNN + Adam on scikit-learn's digits); pass overrides in ARGS.
run: install
	$(BIN)/dlrun $(ARGS)

## The whole test suite, slow end-to-end runs included.
test: install
	$(BIN)/python -m pytest $(ARGS)

## The quick part of the suite (no CLI subprocess runs).
smoke: install
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

## A small sweep: two optimizers, one run folder each under outputs/multirun/.
sweep: install
	$(BIN)/dlrun -m optimizer=sgd,adam trainer.epochs=5 $(ARGS)

## Benchmarks: each prints a table and a JSON line with a ratio measured in the same run.
bench: install
	$(BIN)/python bench/loop_overhead.py
	$(BIN)/python bench/end_to_end.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/ddp_overhead.py

clean:
	rm -rf outputs multirun .pytest_cache build dist src/*.egg-info
