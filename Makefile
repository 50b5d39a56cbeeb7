# Two targets a newcomer needs: `make demo` and `make test`. Both create .venv when it is missing and
# install the LOCKED environment into it (requirements.lock: every package pinned, with hashes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo_cache
LOCK   := requirements.lock
PIP_VERSION := 26.3
UV_VERSION  := 0.13.9
TOOLS  := .tools

.PHONY: demo test test-slow lint bench venv lock check-lock clean schema

# The venv holds exactly the lock (checked after install), plus this package in editable mode.
$(VENV)/.installed: $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	stray="$$($(PY) tests/lockcheck.py stray)"; [ -z "$$stray" ] || $(PY) -m pip uninstall -q -y $$stray
	$(PY) tests/lockcheck.py installed
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

schema: $(VENV)/.installed  ## regenerate the cache's and the run folder's JSON Schemas from their records
	$(PY) -m sak.pipeline.format.schema
	$(PY) -m sak.pipeline.inspection.reports
	$(PY) -m sak.student.schema_gen

bench: $(VENV)/.installed
	$(PY) bench/extract.py

# Regenerate the lock from pyproject.toml (dependencies, the test and train extras, [tool.uv] pins) for
# Linux x86_64 and Python 3.11. uv lives in its own tool venv so that .venv stays exactly the lock.
lock:
	test -x $(TOOLS)/bin/uv || ($(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install -q uv==$(UV_VERSION))
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra test --extra train --extra s3 --extra gs --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		-o $(LOCK)

check-lock:  ## does .venv hold exactly the lock? (make venv runs this too)
	$(PY) tests/lockcheck.py installed

clean:
	rm -rf $(DEMO) .pytest_cache

# The lent GPU machine (docs/gpu.md): `make gpu-wheels` prepares what travels with the device call
# (.gpu-carry/: the wheels the device image lacks, ray trimmed, and the code-version stamp; sizes printed),
# `make gpu-rehearsal OUT=DIR` runs the device entry point (bench/device/run.sh) here in a simulated device
# environment (Python 3.12 with the image's packages only, no .venv, no network, no CUDA; built once into
# .gpu-sim/). On the device: `bash bench/device/run.sh`, results in $OUT/gpu-check.json and .md.
.PHONY: gpu-check gpu-wheels gpu-rehearsal
GPU_PYTHON ?= $(PYTHON)

gpu-wheels:  ## cp312 wheels of what the device image lacks + the code stamp -> .gpu-carry/ (< 64 MiB with the tree)
	$(GPU_PYTHON) bench/device/wheels.py

gpu-rehearsal: gpu-wheels  ## the device entry point here, simulated device env: every step reaches its CUDA check
	@test -n "$(OUT)" || { echo "make gpu-rehearsal OUT=DIR"; exit 2; }
	OUT="$(OUT)" bash bench/device/rehearsal.sh

gpu-check: $(VENV)/.installed  ## on a CUDA machine with .venv: the same steps as the device run -> OUT (default bench/results/local)
	$(PY) bench/gpu_check.py --no-install --out $(or $(OUT),bench/results/local)
