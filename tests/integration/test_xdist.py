"""Under pytest-xdist with the matrix's cases grouped by model (`--dist loadgroup`), two workers on a cold cache
load each model once, build each quantized model once, and give exactly the metrics one process gives. Run end
to end on two small replicas (a team's own matrix through QUANT_MATRIX, weights through QUANT_MODEL_<NAME>)."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import yaml

from quant.config import DATA_DIR_ENV
from quant.project import CACHE_DIR_ENV, MATRIX_ENV
from quant.matrix import load_matrix
from quant.replicas import save_replica
from tests.helpers.matrices import repo_matrix

MODELS = ("llama-3.2-1b", "qwen2.5-0.5b")

# A plugin loaded in every process (-p): it logs each baseline load and each cache build with the process id.
BUILD_LOG = '''
import os
import quant.cache, quant.stores

def _log(line):
    with open(os.environ["BUILD_LOG"], "a") as handle:
        handle.write(f"{line} {os.getpid()}\\n")

_load_model, _cached_dir = quant.stores.load_model, quant.cache.cached_dir

def load_model(spec, device="cpu"):
    _log(f"load {spec.name}")
    return _load_model(spec, device)

def cached_dir(kind, parts, build, root=None):
    def logged_build(folder):
        _log(f"build {kind}/{quant.cache.key_of(parts)}")
        build(folder)
    return _cached_dir(kind, parts, logged_build, root)

quant.stores.load_model = load_model
quant.stores.cached_dir = quant.cache.cached_dir = cached_dir
'''


@pytest.fixture
def replica_matrix(tmp_path, small_tokenizer, shared_data) -> dict[str, str]:
    """Environment for a pytest run of the matrix's cases on two replicas, RTN and GPTQ, WikiText and BoolQ."""
    raw = repo_matrix()
    models = {name: {**raw["models"][name], "dtype": "float32", "tier": "cpu"} for name in MODELS}
    matrix = {
        "seed": raw["seed"], "defaults": raw["defaults"], "costs": {},
        "profiles": {"test": {"cpu": {"wikitext": 2, "boolq": 8, "calib_samples": 4}}},
        "models": models,
        "quant": {"rtn-w4g64": {"method": "rtn", "group_size": 64}, "gptq-w4g64": {"method": "gptq", "group_size": 64}},
        "cases": [{"models": list(MODELS), "quant": ["rtn-w4g64", "gptq-w4g64"], "tasks": ["wikitext", "boolq"]}],
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    env = {MATRIX_ENV: str(path), DATA_DIR_ENV: str(shared_data)}
    for spec in load_matrix(path).models.values():
        env[spec.override_env] = str(save_replica(spec.name, small_tokenizer, tmp_path / spec.name, small=True))
    (tmp_path / "build_log.py").write_text(BUILD_LOG)
    return env


def _run(pytester, monkeypatch, env: dict[str, str], name: str, *args: str
         ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Run the matrix's retention gates on a fresh cache; ((event, process id) per logged event, every cached
    result by key)."""
    cache, log = pytester.path / f"cache-{name}", pytester.path / f"{name}.log"
    for key, value in {**env, CACHE_DIR_ENV: str(cache), "BUILD_LOG": str(log),
                       "PYTHONPATH": str(Path(env[MATRIX_ENV]).parent)}.items():
        monkeypatch.setenv(key, value)
    result = pytester.runpytest_subprocess(env[MATRIX_ENV], "-k", "test_retention",
                                           "-p", "build_log", "-p", "no:cacheprovider", *args, timeout=600)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 8, result.stdout.str()[-3000:]
    results = {path.parent.name: path.read_text() for path in (cache / "results").glob("*/value.json")}
    return [tuple(line.rsplit(" ", 1)) for line in log.read_text().splitlines()], results


def test_two_workers_build_each_model_once_and_match_one_process(pytester, monkeypatch, replica_matrix):
    one, one_results = _run(pytester, monkeypatch, replica_matrix, "one", "-p", "no:xdist")
    two, two_results = _run(pytester, monkeypatch, replica_matrix, "two", "-n", "2", "--dist", "loadgroup")
    for log in (one, two):
        events = collections.Counter(event for event, _ in log)
        assert set(events.values()) == {1}, events  # nothing loaded or built twice
        assert sum(e.startswith("load ") for e in events) == 2
        assert sum(e.startswith("build quantized/") for e in events) == 4  # 2 models x (RTN, GPTQ)
    loads = dict(two)
    assert len({loads[f"load {name}"] for name in MODELS}) == 2  # one worker per model
    assert two_results == one_results and len(one_results) == 12  # 2 models x 3 variants x 2 tasks, same bytes
