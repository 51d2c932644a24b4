# `make run` and `make test` build .venv from nothing when it is missing (pip, editable install with the dev
# extra, every package at its version in requirements.lock), then run the main job / the test suite.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package pinned: pip installs with it as constraints (`make lock` rewrites it; tests/lock.py).
LOCK := requirements.lock
# Real CIFAR-10 training split, when this checkout sits beside the shared folder.
SHARED_TAR := ../shared/data/cifar10-jpg-train.tar.gz
SHARED_DIR := data/cifar10-jpg
# The ONNX Runtime build pip installs: cpu (onnxruntime) or gpu (onnxruntime-gpu, CUDA); never both.
ONNXRUNTIME ?= cpu
RUN_DIR ?= runs/main
EXPORT_DIR ?= exports/$(notdir $(RUN_DIR))
ARGS ?=

# The data `make run` trains on: DATA_DIR=... (torchvision's cifar-10-batches-py, or image folders
# train/<class>/ and optional test/<class>/), else the shared real split (extracted once), else
# torchvision's CIFAR-10 under data/ (downloaded when missing).
ifneq ($(DATA_DIR),)
DATA_FLAGS = --data $(if $(wildcard $(DATA_DIR)/cifar-10-batches-py),cifar10,imagefolder) --data-dir "$(DATA_DIR)"
else ifneq ($(wildcard $(SHARED_TAR)),)
DATA_FLAGS = --data imagefolder --data-dir $(SHARED_DIR)
DATA_READY = $(SHARED_DIR)/train
else
DATA_FLAGS = --data cifar10 --data-dir data
endif

.PHONY: run test test-slow test-latest test-floor lock bench results coverage gpu-check venv clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[$(ONNXRUNTIME),dev]'
	$(BIN)/python tests/lock.py check $(LOCK)
	$(BIN)/python -c "import toolkit, torch, accelerate, onnxruntime, pytest_benchmark"
	touch $(STAMP)

# Resolve pyproject.toml (cpu and dev extras) afresh with pip in a scratch environment and pin the result:
# then run `make test` (the new pins) before committing requirements.lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --dry-run --ignore-installed --report .venv-lock/report.json \
		-e '.[cpu,dev]'
	$(PYTHON) tests/lock.py write .venv-lock/report.json > $(LOCK)
	rm -rf .venv-lock

venv: $(STAMP)

$(SHARED_DIR)/train:
	mkdir -p $(SHARED_DIR)
	tar -xzf $(SHARED_TAR) -C $(SHARED_DIR)

# Trains, evaluates, exports every format, verifies the exports and writes $(RUN_DIR)/report.md.
run: $(STAMP) $(DATA_READY)
	$(BIN)/toolkit run --recipe fast $(DATA_FLAGS) --output-dir $(RUN_DIR) --export-dir $(EXPORT_DIR) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The suite against the newest release of every dependency pyproject.toml admits, in its own .venv-latest
# (what a fresh `pip install cifar-toolkit` gets today); lists the packages newer than the lock first.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[cpu,dev]'
	.venv-latest/bin/python tests/lock.py check $(LOCK) || true
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# The suite against the lowest version of every dependency pyproject.toml admits (tests/floor.py pins
# them), in its own .venv-floor: run it before landing changes to export, loading or training. About
# 4 GB of downloads the first time (torch's CUDA build), then 6-9 minutes on 2 cores.
test-floor:
	test -x .venv-floor/bin/python || $(PYTHON) -m venv .venv-floor
	$(PYTHON) tests/floor.py > .venv-floor/constraints.txt
	.venv-floor/bin/python -m pip install --quiet -c .venv-floor/constraints.txt -e '.[cpu,dev]'
	.venv-floor/bin/python -m pytest -q -p no:cacheprovider

# Every benchmark (none is marked slow; gpu ones skip without CUDA), timings on: one results file
# benchmarks/results/<timestamp>.json for `python -m benchmarks.report`, and pytest-benchmark's own
# storage under benchmarks/results/storage so that `make bench BENCH_ARGS=--benchmark-compare`
# compares with the previous run. About 12-13 minutes on a 2-core CPU (estimated: 8 for the tutorial net's rows, 3.5
# for the heavier models', 1 per server of the serving rows); see benchmarks/README.md.
bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python -m pytest benchmarks -q -m "slow or not slow" --benchmark-enable \
		--benchmark-storage=benchmarks/results/storage --benchmark-autosave \
		--benchmark-json=benchmarks/results/$$(date +%Y%m%d-%H%M%S).json $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.report

# The device paths (training and inference code a GPU runs) and how much of them the CPU test run executes:
# the device tests on the CPU, with coverage, subprocesses included; a report of the lines never run.
DEVICE_TESTS := tests/training/test_gpu.py benchmarks/test_gpu.py tests/benchmarks/test_gpu_check.py
DEVICE_PATHS := toolkit/training/train.py,toolkit/training/data.py,toolkit/training/checkpoint.py,benchmarks/gpu_check.py,benchmarks/test_gpu.py,tests/training/test_gpu.py
coverage: $(STAMP)
	$(BIN)/python -m coverage erase
	$(BIN)/python -m coverage run -m pytest -q -p no:cacheprovider -m "slow or not slow" $(DEVICE_TESTS)
	$(BIN)/python -m coverage combine -q || true
	$(BIN)/python -m coverage report -m --include="$(DEVICE_PATHS)"

# docs/results.md, the full measurement tables, from the results file a `make bench` run left in docs/results/
# (copy benchmarks/results/<timestamp>.json there as $(RESULTS)): generated, never typed.
RESULTS ?= docs/results/bench-cpu.json
results: $(STAMP)
	{ printf '# Measured results\n\nGenerated by `make results` from `%s`, the JSON a `make bench` run wrote. ' "$(RESULTS)"; \
	  printf 'Medians of pytest-benchmark rounds; the machine line says where and when.\n\n'; \
	  $(BIN)/python -m benchmarks.report "$(RESULTS)" --png "$(RESULTS:.json=.png)"; \
	  printf '\n![Inference images/s per runtime](%s)\n' "$(patsubst docs/%,%,$(RESULTS:.json=.png))"; } > docs/results.md

# On a GPU machine (offline; its python3 already has torch, accelerate, onnx, onnxruntime, pytest and
# pytest-benchmark): `python3 -m pip install --no-deps --no-build-isolation -e .`, then
# `make gpu-check OUT=DIR DATA_DIR=data/cifar10-jpg`. About 6 minutes; writes DIR/gpu-check.md and .json.
# QUICK=1: every stage small, on synthetic data, under a minute, on the CPU too (CI runs it that way).
OUT ?= gpu-check
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out "$(OUT)" $(if $(QUICK),--quick) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)")

clean:
	rm -rf $(VENV) .venv-latest .venv-floor .venv-lock .pytest_cache
