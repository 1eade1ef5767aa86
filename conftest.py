"""pytest plumbing: options, the session-wide workbench, and tests generated from matrix.yaml."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from quant import plan
from quant.backends import BackendUnavailable, get_backend
from quant.config import DATA_DIR_ENV, ConfigError, data_dir
from quant.matrix import load_matrix
from quant.pipeline import Workbench
from quant.snapshots import BASELINES, check_hardware, hardware_class
from tests.snapshot_extension import RECORDED, FirstRecording, MetricsSnapshotExtension

pytest_plugins = ["pytester"]  # tests/test_snapshots.py runs syrupy end to end in a scratch folder

PROFILE_ENV = "QUANT_PROFILE"
HARDWARE_ENV = "QUANT_HARDWARE"
WORKER_GPUS_ENV = "QUANT_WORKER_GPUS"  # e.g. "0,1,2,3": one GPU per pytest-xdist worker (.github/workflows/gpu.yml)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quant")
    group.addoption("--data-dir", default=None, help=f"evaluation data folder (default: ${DATA_DIR_ENV})")
    group.addoption("--profile", default=os.environ.get(PROFILE_ENV, "test"),
                    help="matrix profile that sets item counts (test, report)")
    group.addoption("--hardware", default=os.environ.get(HARDWARE_ENV),
                    help="snapshot folder under baselines/ (default: detected: cpu, h100, a100, ...)")
    group.addoption("--plan", action="store_true",
                    help="print what the selected cases would do, with the estimated time, and run nothing")
    group.addoption("--record-baselines", action="store_true",
                    help="on hardware with no baselines/<hardware>/ yet, record every snapshot there for review "
                         "(without it, such a run fails each snapshot test)")


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("quant").setLevel(logging.INFO)
    hardware = config.getoption("--hardware", None)
    if hardware:
        try:
            check_hardware(hardware, hardware_class("cuda") if torch.cuda.is_available() else None)
        except ConfigError as error:
            raise pytest.UsageError(str(error)) from None
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
def new_hardware(request) -> dict[str, bool]:
    """Per hardware folder: whether baselines/<hardware>/ was missing when this session first looked."""
    return {}


@pytest.fixture
def metrics_snapshot(snapshot, workbench, case, new_hardware, request):
    """syrupy's snapshot, stored in baselines/<hardware>/<profile>/ and compared with matrix tolerances; the
    hardware is the case's device (``cpu`` for the CPU tier on every machine; ``--hardware`` names the GPU's).
    Hardware with no baselines/<hardware>/ yet fails every snapshot test, unless --record-baselines asks for the
    first recording, which is listed in the summary for review: a new machine never passes by default."""
    device = workbench.device_for(case.model)
    hardware = (device != "cpu" and request.config.getoption("--hardware")) or hardware_class(device)
    folder = BASELINES / hardware / workbench.profile
    extension = type("MetricsSnapshot", (MetricsSnapshotExtension,), {"directory": folder})
    if new_hardware.setdefault(hardware, not (BASELINES / hardware).exists()):
        if not request.config.getoption("--record-baselines"):
            pytest.fail(f"no snapshot baselines for hardware {hardware!r}: {BASELINES / hardware} does not exist. "
                        f"Record them with `pytest -m \"{request.config.getoption('-m') or ''}\" --record-baselines"
                        f"{' --hardware ' + hardware if device != 'cpu' else ''}`, review the figures and commit the "
                        "folder (README: Snapshot baselines)", pytrace=False)
        return FirstRecording(folder / f"{request.node.path.stem}.{extension.file_extension}", request.node.name,
                              request.config)
    # a user property travels with the test's report, also from pytest-xdist workers, to the summary
    request.node.user_properties.append(("snapshot", "compared"))
    return snapshot.use_extension(extension)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    recorded = config.stash.get(RECORDED, [])
    if recorded:
        terminalreporter.section("snapshots recorded on new hardware")
        for location, name in recorded:
            terminalreporter.write_line(f"recorded {name} in {location}")
        terminalreporter.write_line("review these figures (README: Snapshot baselines) and commit the folder")
    snapshot_tests = [report for outcome, reports in terminalreporter.stats.items() if outcome != "deselected"
                      for report in reports
                      if "::test_snapshot[" in getattr(report, "nodeid", "") and hasattr(report, "user_properties")]
    if snapshot_tests and not any(("snapshot", "compared") in report.user_properties for report in snapshot_tests):
        terminalreporter.section("snapshots")
        terminalreporter.write_line(f"no snapshot was compared with a committed baseline in this run "
                                    f"({len(recorded)} recorded): nothing here says whether the metrics moved")


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


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist loadgroup``, one group per model: a worker loads and quantizes each model once. pytest-xdist
    3.8 cannot group by its xdist_group mark on pytest 9.2 (it appends the group to a node id that pytest no longer
    reads back, so every test becomes its own group: pytest-dev/pytest-xdist#1386), so the scheduler groups by
    the matrix model named in a test's parameters; a test that names none is a group of its own."""
    if config.getoption("dist") != "loadgroup":
        return None
    from tests.xdist_groups import ModelGroupScheduling

    return ModelGroupScheduling(config, log, load_matrix().models)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected, so that --plan shows what would run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Slow cadence (llm-compressor's per-config cadence): run when -m names it, else reported as skipped.
    if "slow" not in (config.getoption("-m") or ""):
        skip_slow = pytest.mark.skip(reason="slow cadence: select with -m slow (e.g. -m 'gpu and slow')")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="gpu tier: CUDA is not available on this machine (torch.cuda.is_available() is False)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # A case whose library backend is not installed skips with the install command (an optional extra).
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case and case.quant.backend:
            try:
                get_backend(case.quant.backend).version()
            except BackendUnavailable as error:
                item.add_marker(pytest.mark.skip(reason=str(error)))
    if config.getoption("--plan"):
        print_plan(config, items)
        config.hook.pytest_deselected(items=list(items))
        items.clear()


def print_plan(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The plan of the selected matrix cases (as python -m quant report --dry-run prints it), one per tier."""
    selected = [item.callspec.params["case"] for item in items if hasattr(item, "callspec")
                and "case" in item.callspec.params and not any(m.name == "skip" and "slow" in m.kwargs.get(
                    "reason", "") for m in item.iter_markers())]
    cases = list({case.id: case for case in selected}.values())
    write = config.pluginmanager.get_plugin("terminalreporter").write_line
    for tier in ("cpu", "gpu"):
        own = [case for case in cases if case.model.tier == tier]
        if own:
            write(plan.describe(load_matrix(), own, config.getoption("--profile"), tier,
                                config.getoption("--hardware") if tier == "gpu" else None))
