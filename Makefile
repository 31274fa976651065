# Two commands do all the set-up: `make test` and `make bench` create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: test bench clean

test: $(STAMP)
	$(PY) -m pytest

bench: $(BENCH_STAMP)
	$(PY) -m harmonica.bench

# Reuse a CUDA build of torch already on the system (its pinned triton comes with it);
# otherwise install the CPU build of torch 2.13.0.
$(STAMP): setup.py
	@if python3 -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The bench extras: matplotlib (the plot) and cache-dit (the DBCache peer rows).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[bench,peers]"
	touch $(BENCH_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
