# Two entry points: `make demo` (the main job on a shipped trace) and `make test` (the full suite, what CI runs);
# `make test-fast` is the inner loop: the suite without the multi-process tests marked slow.
# Each creates .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SYMI := $(VENV)/bin/symi

.PHONY: demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,train,formats]'
	touch $@

demo: $(VENV)/.installed
	rm -rf runs/demo
	$(SYMI) trace info traces/synthetic-drift.parquet
	$(SYMI) simulate --trace traces/synthetic-drift.parquet --cluster paper-a100-16 --model gpt-small \
		--calibration paper-a100-16-gpt-small --capacity-factor 1.0 --out runs/demo
	@echo "figure: runs/demo/comparison.png; tables: runs/demo/summary.csv, runs/demo/iterations.parquet"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed lint
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_plan.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
