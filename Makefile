# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Tests and the demo run on CPU threads; keep the 2-core budget honest.
export OMP_NUM_THREADS ?= 2
PYTEST_ARGS ?=

.PHONY: demo test bench lint dag exps pull clean-data venv

venv: $(STAMP)

# Reinstalls only when pyproject.toml changes (fast no-op otherwise).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

# After pretraining the five evaluation jobs are independent: one thread each, two at a time on the 2 cores
# (Snakemake sets OMP_NUM_THREADS to a job's threads), which overlaps their start-up and single-threaded parts;
# the two longest (detect, finetune) first, so that the short ones fill the other core.
DEMO_THREADS := finetune=1 linprobe=1 analyze=1 segment=1 detect=1
DEMO_FIRST := data/detect data/finetune

demo: $(STAMP)
	$(BIN)/localmim params
	$(BIN)/snakemake --cores 2 --set-threads $(DEMO_THREADS) --prioritize $(DEMO_FIRST)
	@echo
	@$(BIN)/localmim report
	@echo
	@echo "Where to look next:"
	@echo "  data/analyze/layers.png, data/analyze/reconstructions.png, data/segment/grid.png,"
	@echo "  data/detect/val_predictions.png, reports/metrics.png                     (pictures of the results)"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db              (every run, curves, lineage, registered encoders)"
	@echo "  $(BIN)/localmim compare --out outputs/compare                        (pipeline runs side by side, with plots)"
	@echo "  $(BIN)/dvc plots show   then open dvc_plots/index.html               (training curves)"
	@echo "  $(BIN)/snakemake --report report.html                                (metrics table and plot with each rule's params)"

# Two pytest workers on the 2 cores, one thread each; a test file stays on one worker (--dist loadfile), so a
# module's expensive fixture (a whole DAG run) is built once.
test: $(STAMP)
	$(BIN)/ruff check --no-cache localmim tests benchmarks
	$(BIN)/localmim dag --check
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

bench: $(STAMP)  ## BENCH_ARGS=--with-mae also reruns the LocalMIM-vs-MAE comparison
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check localmim tests benchmarks

dag: $(STAMP)
	$(BIN)/localmim dag --write

exps: $(STAMP)  ## DVC experiments with the params that matter and the headline metrics (ARGS=... adds dvc exp show args)
	$(BIN)/python -m localmim.pipeline.dag exps $(ARGS)

pull: $(STAMP)  ## a fresh clone: `dvc pull`, then record for Snakemake the stages DVC restored (ARGS=-r REMOTE)
	$(BIN)/localmim pull $(ARGS)

clean-data:
	rm -rf data/raw data/shards data/views data/pretrain data/finetune data/linprobe data/analyze data/segment data/detect data/checkpoints metrics/*.json metrics/*.csv metrics/curves logs reports/metrics.tsv .snakemake
