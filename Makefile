# Two entry points: `make demo` (the main job on a shipped trace) and `make test`.
# Both create .venv on first use and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SYMI := $(VENV)/bin/symi

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,train]'
	touch $@

demo: $(VENV)/.installed
	$(SYMI) trace info traces/olmoe-domains.parquet
	$(SYMI) plan --trace traces/synthetic-drift.parquet --cluster paper-a100-16 --replay \
		--policies static,symi,symi-balanced,eplb,flexmoe,fastermoe,lazarus,oracle --out runs/demo-plan

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_plan.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
