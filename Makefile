# The README's two commands. Everything installs into .venv; nothing else is needed.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned to the CPU wheel by default: an unpinned torch pulls gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# Nothing is downloaded from a hub at run time, in the demo or in the tests.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,app]"
	touch $@

demo: install
	$(PY) examples/demo.py --output_dir demo_output

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) benchmarks/build_identifiers.py
	$(PY) benchmarks/decoding.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
