# Two entry points on a fresh machine:
#   make reproduce   create .venv and run the CPU-scale grid (results/cpu/)
#   make test        create .venv and run the test suite
# Both read the data root from DCL_DATA_ROOT (default: ./data), the folder that
# holds cifar10/ (image folders train/ and test/, or torchvision's files).

PYTHON ?= python3
VENV ?= .venv
DCL_DATA_ROOT ?= data
export DCL_DATA_ROOT
# Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning
# threads made a training step up to ten times slower whenever another process ran.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY
PYTEST_ARGS ?=

.PHONY: setup reproduce test smoke clean-smoke

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

reproduce: setup
	$(VENV)/bin/snakemake all --configfile config/cpu.yaml

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

smoke: setup
	$(VENV)/bin/snakemake all --configfile config/smoke.yaml
