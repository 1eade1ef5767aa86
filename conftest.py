"""pytest plumbing: options, the session-wide workbench, and tests generated from matrix.yaml."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from quant.config import DATA_DIR_ENV, REPO_ROOT, data_dir
from quant.matrix import load_matrix
from quant.pipeline import Workbench
from quant.snapshots import hardware_class
from tests.snapshot_extension import MetricsSnapshotExtension

pytest_plugins = ["pytester"]  # tests/test_snapshots.py runs syrupy end to end in a scratch folder

PROFILE_ENV = "QUANT_PROFILE"
HARDWARE_ENV = "QUANT_HARDWARE"
WORKER_GPUS_ENV = "QUANT_WORKER_GPUS"  # e.g. "0,1,2,3": one GPU per pytest-xdist worker (.github/workflows/gpu.yml)
BASELINES = REPO_ROOT / "baselines"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quant")
    group.addoption("--data-dir", default=None, help=f"evaluation data folder (default: ${DATA_DIR_ENV})")
    group.addoption("--profile", default=os.environ.get(PROFILE_ENV, "test"),
                    help="matrix profile that sets item counts (test, report)")
    group.addoption("--hardware", default=os.environ.get(HARDWARE_ENV),
                    help="snapshot folder under baselines/ (default: detected: cpu, h100, a100, ...)")


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("quant").setLevel(logging.INFO)
    worker, gpus = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(WORKER_GPUS_ENV)
    if worker and gpus:  # xdist worker gwN gets the N-th GPU; CUDA reads this when it first initialises, later
        gpus = gpus.split(",")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[int(worker.removeprefix("gw")) % len(gpus)]
    if config.getoption("--snapshot-update", False):
        if getattr(config.option, "numprocesses", None):
            # each worker sees only its share of the tests and would prune the others' snapshots as unused
            raise pytest.UsageError("--snapshot-update cannot run under pytest-xdist (-n); run it without -n")
        # syrupy counts the cases a -m/-k selection left out (slow, gpu) as unused and would delete them; a
        # case removed from the matrix leaves its snapshot to be deleted by hand, in review.
        config.option.no_cleanup = True


@pytest.fixture(scope="session")
def matrix():
    return load_matrix()


@pytest.fixture(scope="session")
def workbench(matrix, request) -> Workbench:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Workbench(matrix, request.config.getoption("--profile"),
                     data_dir(request.config.getoption("--data-dir")), device)


@pytest.fixture(scope="session")
def snapshot_folder(workbench, request):
    hardware = request.config.getoption("--hardware") or hardware_class(workbench.device)
    return BASELINES / hardware / workbench.profile


@pytest.fixture(scope="session")
def metrics_snapshot_extension(snapshot_folder):
    return type("MetricsSnapshot", (MetricsSnapshotExtension,), {"directory": snapshot_folder})


@pytest.fixture
def metrics_snapshot(snapshot, metrics_snapshot_extension):
    """syrupy's snapshot, stored in baselines/<hardware>/<profile>/ and compared with matrix tolerances."""
    return snapshot.use_extension(metrics_snapshot_extension)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``case`` runs once per matrix case, with ids like smollm2-135m-rtn-w4g128-boolq."""
    if "case" not in metafunc.fixturenames:
        return
    params = []
    for case in load_matrix().cases:
        marks = [pytest.mark.slow] if case.cadence == "slow" else []
        if case.model.tier == "gpu":
            marks.append(pytest.mark.gpu)
        if case.expected_failure and metafunc.definition.get_closest_marker("regression_gate"):
            # strict: the day it passes, someone must update the matrix
            marks.append(pytest.mark.xfail(reason=case.expected_failure, strict=True))
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("case", params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
