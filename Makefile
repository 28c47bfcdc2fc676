# The verbs people use. Every target that needs Python creates the project's
# virtual environment (.venv) first if it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install run test smoke sweep bench results ablation clean

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

## The whole test suite, slow end-to-end runs included, on every core (pytest-xdist; the tests of one
## xdist_group, such as those sharing one Slurm cluster, on one worker). Some start real servers from the
## machine's packages (tests/servers.py: PostgreSQL, Slurm); .ci/run installs them.
test: install
	$(BIN)/python -m pytest -n auto --dist loadgroup $(ARGS)

## The quick part of the suite: no test that starts a process (they are marked slow).
smoke: install
	$(BIN)/python -m pytest -n auto --dist loadgroup -m "not slow" $(ARGS)

## A small sweep: two optimizers, one run folder each under outputs/multirun/.
sweep: install
	$(BIN)/dlrun -m optimizer=sgd,adam trainer.epochs=5 $(ARGS)

## Benchmarks: each prints a table and a JSON line with ratios measured in one run; bench/run_all.py keeps
## them in results/bench.json and regenerates the README's Performance table.
bench: install
	$(BIN)/python bench/run_all.py $(ARGS)

## Rerun every preset the README quotes on three seeds and regenerate its results tables (about 17 minutes here).
results: install
	$(BIN)/python scripts/results.py $(ARGS)

## What each ingredient of the recipe presets buys (scripts/ablation.py): the README's ablation tables. All three
## recipes take about an hour one run at a time on the README's AMD EPYC; ARGS="--jobs 2" runs two at a time (one
## thread each), and ARGS=mnist1d_cnn_swa (about 14 minutes there) measures one recipe.
ablation: install
	$(BIN)/python scripts/ablation.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache build dist src/*.egg-info
