# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each creates the virtual environment on a fresh machine if it is missing or out of date.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.peft-dist-installed
# DeepSpeed on a machine without a GPU: its CPU accelerator (no compiled ops needed at install time).
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0

.PHONY: env demo test clean

env: $(STAMP)

# torch + torchvision come from the package registry: PyPI's torchvision only loads against PyPI's torch build
# (a CUDA build, which runs fine on a CPU-only machine). Then the package with every extra the tests exercise.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[dev,deepspeed,legacy]"
	$(PY) -c "import torch, torchvision, timm, webdataset, mlflow, deepspeed; print('environment ready: torch', torch.__version__, 'timm', timm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peft-dist demo --out-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 tests

clean:
	rm -rf $(VENV) runs
