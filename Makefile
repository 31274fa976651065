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

.PHONY: test bench test-latest constraints gpu-check gpu-check-plan clean

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

# The first hour on a lent H100/H200: every stage runs under a wall-clock timeout (seconds; -k: SIGKILL 15 s
# after SIGTERM) and even when an earlier one failed; logs, results JSONs and stages.txt (each stage's exit
# status and seconds) land in GPU_CHECK_DIR; the exit status is non-zero when any stage failed.
# Estimate (bench/plan.py, H100): suite 244 s, kernel stage 54 s; the test stages are bounded by their
# timeouts; every stage at its timeout: 560 s (+15 s grace each), under the device's 10 min per command.
# `make gpu-check-plan` prints the suite's rows and estimate on any machine.
GPU_CHECK_DIR ?= bench/results/gpu-check-$(GPU_CHECK_STAMP)
GPU_CHECK_STAMP := $(shell date -u +%Y-%m-%d)-$(shell git rev-parse --short HEAD 2>/dev/null)
GPU_CHECK_SUITE := --models dit-xl-2-256 pixart-alpha-1024 --steps 20 --configs no-cache fora:2 harmonica \
	--modes eager fused graphs graphs-step compile --repeat 3 --max-compiled-graphs 2
AOT_TIMEOUT ?= 60
GPU_TESTS_TIMEOUT ?= 100
KERNELS_TIMEOUT ?= 80
SUITE_TIMEOUT ?= 300
TABLES_TIMEOUT ?= 20

# $(call gpu_stage,name,timeout,command): output shown and kept in GPU_CHECK_DIR/name.log
define gpu_stage
	@echo "== $(1) (timeout $(2) s)"; start=$$(date +%s); \
	timeout -k 15 $(2) $(3) 2>&1 | tee $(GPU_CHECK_DIR)/$(1).log; rc=$${PIPESTATUS[0]}; \
	echo "$(1) exit=$$rc seconds=$$(( $$(date +%s) - start ))" | tee -a $(GPU_CHECK_DIR)/stages.txt
endef

gpu-check: SHELL := /bin/bash
gpu-check: $(STAMP)
	@mkdir -p $(GPU_CHECK_DIR) && rm -f $(GPU_CHECK_DIR)/stages.txt
	$(call gpu_stage,aot-compile,$(AOT_TIMEOUT),$(PY) -m pytest tests/test_aot_compile.py -q)
	$(call gpu_stage,gpu-tests,$(GPU_TESTS_TIMEOUT),$(PY) -m pytest -m gpu -q)
	$(call gpu_stage,kernels,$(KERNELS_TIMEOUT),$(PY) -m harmonica.bench --part kernels --out $(GPU_CHECK_DIR)/kernels.json)
	$(call gpu_stage,suite,$(SUITE_TIMEOUT),$(PY) -m harmonica.bench --part suite $(GPU_CHECK_SUITE) --no-progress \
		--out $(GPU_CHECK_DIR)/suite.json)
	$(call gpu_stage,tables,$(TABLES_TIMEOUT),$(PY) -m harmonica.bench.table --write $(GPU_CHECK_DIR)/kernels.json \
		$(GPU_CHECK_DIR)/suite.json)
	@awk '$$2 != "exit=0" {failed = 1; print "FAILED: " $$0} END {exit failed}' $(GPU_CHECK_DIR)/stages.txt \
		&& echo "gpu-check: every stage passed; results in $(GPU_CHECK_DIR)"

gpu-check-plan: $(STAMP)
	$(PY) -m harmonica.bench --plan --device cuda --part suite $(GPU_CHECK_SUITE)

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
