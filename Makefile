# `make run` and `make test` build .venv from nothing (pip, editable install with the dev extra)
# when it is missing, then run the main job / the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real CIFAR-10 training split, when this checkout sits beside the shared folder.
SHARED_TAR := ../shared/data/cifar10-jpg-train.tar.gz
SHARED_DIR := data/cifar10-jpg
RUN_DIR ?= runs/main
EXPORT_DIR ?= exports/$(notdir $(RUN_DIR))
ARGS ?=

.PHONY: run test test-slow bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import toolkit, torch, accelerate, onnxruntime, pytest_benchmark"
	touch $(STAMP)

venv: $(STAMP)

# DATA_DIR=... points at a local CIFAR-10 copy (torchvision layout, or image folders with
# train/<class>/ and optional test/<class>/). Without it: the shared real training split when
# present, else torchvision's CIFAR-10 under data/ (downloaded when missing).
# Trains, evaluates, exports every format, verifies the exports and writes $(RUN_DIR)/report.md.
run: $(STAMP)
	@if [ -n "$(DATA_DIR)" ]; then \
		if [ -d "$(DATA_DIR)/cifar-10-batches-py" ]; then src=cifar10; else src=imagefolder; fi; \
		set -x; $(BIN)/toolkit run --recipe fast --data $$src --data-dir "$(DATA_DIR)" --output-dir $(RUN_DIR) --export-dir $(EXPORT_DIR) $(ARGS); \
	elif [ -f "$(SHARED_TAR)" ]; then \
		test -d $(SHARED_DIR)/train || (mkdir -p $(SHARED_DIR) && tar -xzf $(SHARED_TAR) -C $(SHARED_DIR)); \
		set -x; $(BIN)/toolkit run --recipe fast --data imagefolder --data-dir $(SHARED_DIR) --output-dir $(RUN_DIR) --export-dir $(EXPORT_DIR) $(ARGS); \
	else \
		set -x; $(BIN)/toolkit run --recipe fast --data cifar10 --data-dir data --output-dir $(RUN_DIR) --export-dir $(EXPORT_DIR) $(ARGS); \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Every benchmark (none is marked slow; gpu ones skip without CUDA), timings on: one results file
# benchmarks/results/<timestamp>.json for `toolkit bench-report`, and pytest-benchmark's own storage
# under benchmarks/results/storage so that `make bench BENCH_ARGS=--benchmark-compare` compares
# with the previous run. About 10 minutes on a 2-core CPU; see benchmarks/README.md.
bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python -m pytest benchmarks -q -m "slow or not slow" --benchmark-enable \
		--benchmark-storage=benchmarks/results/storage --benchmark-autosave \
		--benchmark-json=benchmarks/results/$$(date +%Y%m%d-%H%M%S).json $(BENCH_ARGS)
	$(BIN)/toolkit bench-report

clean:
	rm -rf $(VENV) .pytest_cache
