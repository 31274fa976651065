# Two commands do all the set-up: `make test` and `make bench` create .venv on first use, with the
# versions the suite last passed with (constraints-py<X.Y>.txt for this Python; torch and triton are
# not pinned there: see $(STAMP)). `make test-latest` tests the newest releases in .venv-latest instead;
# once it passes, `make constraints` records them.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
PYTHON_VERSION := $(shell python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CONSTRAINTS := constraints-py$(PYTHON_VERSION).txt
# with no constraints file for this Python, the newest releases
PIN := $(if $(wildcard $(CONSTRAINTS)),-c $(CONSTRAINTS),)
LATEST := .venv-latest

.PHONY: test bench test-latest constraints gpu-kit gpu-check gpu-check-tables gpu-check-plan clean

test: $(STAMP)
	$(PY) -m pytest

bench: $(BENCH_STAMP)
	$(PY) -m harmonica.bench

# A fresh venv with the newest releases of every dependency (torch: as in $(STAMP)), then the suite.
test-latest:
	rm -rf $(LATEST)
	$(MAKE) --no-print-directory VENV=$(LATEST) PIN= $(LATEST)/.installed-bench
	$(LATEST)/bin/python -m pytest

# Records the versions in .venv-latest (run after `make test-latest` passed) as this Python's constraints.
constraints:
	@test -f $(LATEST)/.installed-bench || { echo "constraints: run make test-latest first"; exit 2; }
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(CONSTRAINTS).freeze
	{ echo "# What make test and make bench install on Python $(PYTHON_VERSION) (torch and triton: see the Makefile)."; \
	  echo "# Written by make constraints from $(LATEST) on $$(date -u +%Y-%m-%d), after make test-latest passed."; \
	  grep -viE '^(torch|triton)==' $(CONSTRAINTS).freeze; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm $(CONSTRAINTS).freeze
	@echo "wrote $(CONSTRAINTS)"

# The first hour on a lent GPU (bench/gpu/check.sh, docs/benchmarks.md). Here, with network: `make gpu-kit` downloads
# the wheels the device image lacks (CPython 3.12, manylinux x86-64) into $(GPU_KIT), which the device tool
# carries; `make gpu-check-plan` prints the two device commands, their stages and budget, and the suite's rows.
# There, `bash bench/gpu/check.sh 1` and `bash bench/gpu/check.sh 2` set up offline on the image's own python3 and run.
# `make gpu-check` runs both parts on this machine's GPU with GPU_PY; `make gpu-check-tables` writes the
# BENCHMARKS.md tables of their JSONs (fetched from the device into GPU_CHECK_DIR).
GPU_PY ?= python3
GPU_KIT := .gpu-kit
GPU_CHECK_DIR ?= bench/results/gpu-check-$(shell date -u +%Y-%m-%d)-$(shell git rev-parse --short HEAD 2>/dev/null)
GPU_CHECK := PY=$(GPU_PY) GPU_KIT=$(GPU_KIT) GPU_CHECK_DIR=$(GPU_CHECK_DIR) bash bench/gpu/check.sh

gpu-kit: $(STAMP)
	$(PY) bench/gpu/kit.py --dest $(GPU_KIT) $(if $(PIN),--constraints $(CONSTRAINTS))

gpu-check:
	$(GPU_CHECK) 1; one=$$?; $(GPU_CHECK) 2 && [ $$one = 0 ]

gpu-check-tables: $(STAMP)
	$(PY) -m harmonica.bench.table --write $(GPU_CHECK_DIR)/kernels.json $(GPU_CHECK_DIR)/suite.json

gpu-check-plan: $(STAMP)
	@bash bench/gpu/check.sh plan
	$(PY) -m harmonica.bench --plan --device cuda --part suite $$(bash bench/gpu/check.sh suite-args)

# Reuse a CUDA build of torch already on the system (its pinned triton comes with it);
# otherwise install the CPU build of torch 2.13.0.
$(STAMP): setup.py $(wildcard $(CONSTRAINTS))
	@echo "installing into $(VENV): $(if $(PIN),the versions of $(CONSTRAINTS),the newest releases)"
	@if python3 -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q $(PIN) -e ".[test]"
	touch $(STAMP)

# The bench extras: matplotlib (the plot) and cache-dit (the DBCache peer rows).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q $(PIN) -e ".[bench,peers]"
	touch $(BENCH_STAMP)

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .benchmarks build *.egg-info
