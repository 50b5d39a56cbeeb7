# Two targets a newcomer needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo_cache

.PHONY: demo test test-slow lint bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed  ## extract tiny DINOv2/CLIP/SAM features of the scikit-image photos on a local Ray, then train
	$(PY) -m sak.cli.demo --out $(DEMO)

test: $(VENV)/.installed  ## the default CPU-only test tier
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) bench/extract.py

clean:
	rm -rf $(DEMO) .pytest_cache

.PHONY: gpu-check
gpu-check: $(VENV)/.installed  ## on a lent H100/H200: GPU tests + kernel/train/extract benchmarks -> bench/results/ (< 8 min); elsewhere prints the plan
	$(PY) bench/gpu_check.py
