"""pytest plumbing: options, the session-wide workbench, and tests generated from matrix.yaml."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from quant.config import DATA_DIR_ENV, data_dir
from quant.matrix import load_matrix
from quant.pipeline import Workbench

PROFILE_ENV = "QUANT_PROFILE"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quant")
    group.addoption("--data-dir", default=None, help=f"evaluation data folder (default: ${DATA_DIR_ENV})")
    group.addoption("--profile", default=os.environ.get(PROFILE_ENV, "test"),
                    help="matrix profile that sets item counts (test, report)")


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("quant").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def matrix():
    return load_matrix()


@pytest.fixture(scope="session")
def workbench(matrix, request) -> Workbench:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Workbench(matrix, request.config.getoption("--profile"),
                     data_dir(request.config.getoption("--data-dir")), device)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``case`` runs once per matrix case, with ids like smollm2-135m-rtn-w4g128-boolq."""
    if "case" not in metafunc.fixturenames:
        return
    params = []
    for case in load_matrix().cases:
        marks = [pytest.mark.slow] if case.cadence == "slow" else []
        if case.model.tier == "gpu":
            marks.append(pytest.mark.gpu)
        if case.expected_failure:  # strict: the day it passes, someone must update the matrix
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
