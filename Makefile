# `make run` and `make test` do all the set-up: a local virtual environment in .venv,
# PyTorch (served from the local wheel cache where one exists), then this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/lors detect compare --seeds 0 1 --out runs/compare

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build src/*.egg-info
