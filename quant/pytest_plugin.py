"""The suite's pytest plugin (the one module of the package that imports pytest), installed through the ``pytest11``
entry point: options, the matrix file of the project collected as test items (two tests per case), the session-wide
workbench, the metric snapshots (a syrupy extension storing one readable JSON file, compared with the matrix's
tolerances), the scheduler that keeps one model's tests on one pytest-xdist worker, and the run's summary (the
joint verdict, snapshots recorded or not compared).

In a project with no matrix configured (``--matrix``, ``$QUANT_MATRIX`` or ``[tool.quant] matrix``) the plugin
collects nothing and changes nothing; the library (torch, transformers) is imported only where a matrix is."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from filelock import FileLock
from syrupy.data import Snapshot, SnapshotCollection
from syrupy.extensions.base import AbstractSyrupyExtension

from quant.config import DATA_DIR_ENV, ConfigError, check_profile, data_dir, load_yaml
from quant.project import MATRIX_ENV, Project


# ---- metric snapshots: storage and the syrupy extension ---------------------------------------------------------

def _read(location: str) -> dict[str, Any]:
    path = Path(location)
    return json.loads(path.read_text()) if path.exists() else {}


def _lock(location: str) -> FileLock:
    """Serialises writers of one snapshot file (xdist workers); kept out of baselines/, which syrupy scans."""
    digest = hashlib.sha256(str(Path(location).resolve()).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"quant-snapshot-{digest}.lock")


def _dumps(records: dict[str, Any]) -> str:
    """JSON with one line per metric, so that a pull request's diff shows exactly which figures moved."""
    blocks = []
    for name, entry in sorted(records.items()):
        metrics = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in entry["metrics"].items())
        blocks.append(f" {json.dumps(name)}: {{\n  \"exact\": {json.dumps(entry['exact'])},\n"
                      f"  \"metrics\": {{\n{metrics}\n  }}\n }}")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _write(location: str, records: dict[str, Any]) -> None:
    path = Path(location)
    if not records:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(_dumps(records))
    partial.replace(path)


def record(location: str, name: str, entry: dict[str, Any]) -> None:
    """Add or replace one snapshot in the file at ``location``, under its lock."""
    with _lock(location):
        _write(location, {**_read(location), name: entry})


RECORDED = pytest.StashKey[list]()  # (file, snapshot name) recorded by FirstRecording in this session


class FirstRecording:
    """Stands in for the snapshot on hardware with no baselines yet: ``==`` records the case's figures and holds,
    and the session's summary lists what was recorded for review."""

    def __init__(self, location: Path, name: str, config: pytest.Config) -> None:
        self.location, self.name, self.config = location, name, config

    def __eq__(self, entry: object) -> bool:
        record(str(self.location), self.name, entry)
        self.config.stash.setdefault(RECORDED, []).append((self.location, self.name))
        return True

    __hash__ = None


class MetricsSnapshotExtension(AbstractSyrupyExtension):
    file_extension = "json"
    directory: ClassVar[Path]  # bound per run by the metrics_snapshot fixture (baselines/<hardware>/<profile>)

    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        return str(cls.directory)

    @classmethod
    def get_file_basename(cls, *, test_location: Any, index: Any) -> str:
        if Path(test_location.filepath).suffix in (".yaml", ".yml"):  # a matrix case: the file its baselines keep
            from quant.snapshots import SNAPSHOT_FILE
            return Path(SNAPSHOT_FILE).stem
        return super().get_file_basename(test_location=test_location, index=index)

    def serialize(self, data: Any, **_: Any) -> str:
        return json.dumps(data, indent=1)

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        from quant.snapshots import regressions
        return not regressions(json.loads(snapshot_data), json.loads(serialized_data))

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
        from quant.snapshots import regressions
        yield f"regression against the snapshot in {self.directory}:"
        for problem in regressions(json.loads(snapshot_data), json.loads(serialized_data)):
            yield f"  {problem}"

    def read_snapshot_collection(self, *, snapshot_location: str) -> SnapshotCollection:
        collection = SnapshotCollection(location=snapshot_location)
        for name, entry in _read(snapshot_location).items():
            collection.add(Snapshot(name=name, data=self.serialize(entry)))
        return collection

    def read_snapshot_data_from_location(self, *, snapshot_location: str, snapshot_name: str,
                                         session_id: str) -> str | None:
        entry = _read(snapshot_location).get(snapshot_name)
        return None if entry is None else self.serialize(entry)

    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection: SnapshotCollection,
                                  name_order: dict[str, int] | None = None) -> None:
        for snapshot in snapshot_collection:
            record(snapshot_collection.location, snapshot.name, json.loads(snapshot.data))

    def delete_snapshots(self, *, snapshot_location: str, snapshot_names: set[str]) -> None:
        with _lock(snapshot_location):
            records = _read(snapshot_location)
            _write(snapshot_location, {k: v for k, v in records.items() if k not in snapshot_names})

# ---- pytest-xdist: one model's tests on one worker ---------------------------------------------------------------

def _model_group_scheduling() -> type:
    """The scheduler class, defined when pytest-xdist is there to be subclassed (its hook runs only then)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModelGroupScheduling(LoadScopeScheduling):
        """LoadScope's whole-group-to-one-worker scheduling, with a test's group being the model its parameters
        name (``test_retention[smollm2-135m-rtn-w4g128-boolq]`` -> ``smollm2-135m``), else the test itself."""

        def __init__(self, config, log, models: Iterable[str]) -> None:
            super().__init__(config, log)
            self.models = sorted(models, key=len, reverse=True)  # the longest first: no name hides in a longer one

        def _split_scope(self, nodeid: str) -> str:
            params = nodeid.partition("[")[2]
            return next((model for model in self.models if model in params), nodeid)

    return ModelGroupScheduling


# ---- the matrix file as a test module ----------------------------------------------------------------------------

def test_retention(case, workbench, record_gate):
    """The case against its baseline model: retention (or the kind's fallback), divergences, the joint gate."""
    from quant.report import describe

    comparison = workbench.settle(case)
    record_gate(case.id, comparison)
    assert not comparison.verdict.failed, describe(comparison)


test_retention = pytest.mark.regression_gate(test_retention)


def test_snapshot(case, workbench, metrics_snapshot):
    """Metrics within tolerance of <baselines>/<hardware>/<profile>/test_matrix.json; items, config, bytes exact."""
    assert metrics_snapshot == workbench.snapshot(case)


class MatrixFile(pytest.Module):
    """The project's matrix YAML, collected as a module holding the two tests above, each run once per case
    (``pytest_generate_tests``): node ids like ``quant.yaml::test_retention[smollm2-135m-rtn-w4g128-boolq]``."""

    def _getobj(self) -> types.ModuleType:
        module = types.ModuleType("quant_matrix", self.__doc__)
        module.test_retention, module.test_snapshot = test_retention, test_snapshot
        return module

    def istestfunction(self, obj: object, name: str) -> bool:
        return name in ("test_retention", "test_snapshot")  # whatever python_functions the project sets


# ---- options, fixtures and hooks ---------------------------------------------------------------------------------

PROFILE_ENV = "QUANT_PROFILE"
HARDWARE_ENV = "QUANT_HARDWARE"
WORKER_GPUS_ENV = "QUANT_WORKER_GPUS"  # e.g. "0,1,2,3": one GPU per pytest-xdist worker (.github/workflows/gpu.yml)
MATRIX = pytest.StashKey[Path]()  # the configured matrix file; absent: the plugin does nothing
PROJECT = pytest.StashKey[Project]()
LOADED = pytest.StashKey[Any]()  # the parsed matrix, once per process


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quant")
    group.addoption("--matrix", default=None, metavar="PATH",
                    help=f"the matrix file to collect (default: ${MATRIX_ENV}, else [tool.quant] matrix in the "
                         "rootdir's pyproject.toml)")
    group.addoption("--data-dir", default=None, help=f"evaluation data folder (default: ${DATA_DIR_ENV})")
    group.addoption("--profile", default=os.environ.get(PROFILE_ENV, "test"),
                    help="matrix profile that sets item counts (test, report)")
    group.addoption("--hardware", default=os.environ.get(HARDWARE_ENV),
                    help="snapshot folder under baselines/ (default: detected: cpu, h100, a100, ...)")
    group.addoption("--plan", action="store_true",
                    help="print what the selected cases would do, with the estimated time, and run nothing")
    group.addoption("--gate-summary", default=None, metavar="PATH",
                    help="append a markdown table of the gates that ran and the joint verdict to PATH "
                         "(e.g. $GITHUB_STEP_SUMMARY)")
    group.addoption("--record-baselines", action="store_true",
                    help="on hardware with no baselines/<hardware>/ yet, record every snapshot there for review "
                         "(without it, such a run fails each snapshot test)")


MARKERS = (
    "gpu: needs CUDA; skipped with a reason where CUDA is absent",
    "slow: long-running case, excluded from the default run (select with -m slow)",
    "regression_gate: the test gates a matrix case against the baseline (a case's expected_failure applies)",
    "float_sensitive: compares results of different float-operation orders within a tolerance; make test runs these "
    "a second time on another CPU code path and thread count",
)


def _selects_gpu(expression: str) -> bool:
    """Whether a -m expression asks for the gpu mark (``gpu``, ``gpu and slow``; not ``not gpu``)."""
    return bool(re.search(r"(?<!not )\bgpu\b", expression))


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    try:
        project = Project.at(config.rootpath)
        path = project.matrix(config.getoption("--matrix"))
        if path is None:
            if _selects_gpu(config.getoption("-m") or ""):
                raise ConfigError(f"-m {config.getoption('-m')!r} selects the matrix's gpu cases, but no matrix is "
                                  f"configured: looked at {project.where_matrix_is_looked_for()} (`quant init` writes "
                                  "one)")
            return
        path = project.require_matrix(path)
        if not path.is_file():
            raise ConfigError(f"{path}: matrix file not found (named by --matrix, ${MATRIX_ENV} or [tool.quant])")
        # the profile before any case is collected: its YAML alone (the library loads with the cases)
        check_profile(load_yaml(path).get("profiles", {}), config.getoption("--profile"), path,
                      f"--profile (or ${PROFILE_ENV})")
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    config.stash[MATRIX], config.stash[PROJECT] = path.resolve(), project
    if config.args_source != pytest.Config.ArgsSource.ARGS and not _covered(path.resolve(), config):
        config.args.append(str(path))  # a bare `pytest` runs the matrix's cases beside the project's own tests
    logging.getLogger("quant").setLevel(logging.INFO)
    hardware = config.getoption("--hardware", None)
    if hardware:
        import torch

        from quant.snapshots import check_hardware, hardware_class
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


def _covered(path: Path, config: pytest.Config) -> bool:
    """Whether collecting ``config.args`` reaches the matrix file anyway (it is one of them, or inside one)."""
    for arg in config.args:
        target = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if path == target or target in path.parents:
            return True
    return False


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    matrix = parent.config.stash.get(MATRIX, None)
    if matrix is not None and file_path.resolve() == matrix:
        return MatrixFile.from_parent(parent, path=file_path)
    return None


def _matrix(config: pytest.Config) -> Any:
    """The configured matrix, parsed once per process; a project without one fails the test that asked for it."""
    if MATRIX not in config.stash:
        raise pytest.UsageError(f"a test asks for the matrix's cases, but no matrix is configured: looked at "
                                f"{Project.at(config.rootpath).where_matrix_is_looked_for()}")
    if LOADED not in config.stash:
        from quant.matrix import load_matrix
        try:
            config.stash[LOADED] = load_matrix(config.stash[MATRIX])
        except ConfigError as error:
            raise pytest.UsageError(str(error)) from None
    return config.stash[LOADED]


@pytest.fixture(scope="session")
def matrix(request):
    return _matrix(request.config)


@pytest.fixture(scope="session")
def workbench(matrix, request):
    from quant.pipeline import Workbench
    from quant.snapshots import local_device
    return Workbench(matrix, request.config.getoption("--profile"),
                     data_dir(request.config.getoption("--data-dir")), local_device())


@pytest.fixture(scope="session")
def new_hardware(request) -> dict[str, bool]:
    """Per hardware folder: whether baselines/<hardware>/ was missing when this session first looked."""
    return {}


@pytest.fixture
def metrics_snapshot(snapshot, workbench, case, new_hardware, request):
    """syrupy's snapshot, stored in <baselines>/<hardware>/<profile>/ (the project's baselines folder) and compared
    with matrix tolerances; the hardware is the case's device (``cpu`` for the CPU tier on every machine;
    ``--hardware`` names the GPU's). Hardware with no <baselines>/<hardware>/ yet fails every snapshot test, unless
    --record-baselines asks for the first recording, which is listed in the summary for review: a new machine never
    passes by default."""
    from quant.snapshots import SNAPSHOT_FILE, hardware_class

    baselines = request.config.stash[PROJECT].baselines
    device = workbench.device_for(case.model)
    hardware = (device != "cpu" and request.config.getoption("--hardware")) or hardware_class(device)
    folder = baselines / hardware / workbench.settings.profile
    extension = type("MetricsSnapshot", (MetricsSnapshotExtension,), {"directory": folder})
    if new_hardware.setdefault(hardware, not (baselines / hardware).exists()):
        if not request.config.getoption("--record-baselines"):
            pytest.fail(f"no snapshot baselines for hardware {hardware!r}: {baselines / hardware} does not exist. "
                        f"Record them with `pytest -m \"{request.config.getoption('-m') or ''}\" --record-baselines"
                        f"{' --hardware ' + hardware if device != 'cpu' else ''}`, review the figures and commit the "
                        "folder (README: Snapshot baselines)", pytrace=False)
        return FirstRecording(folder / SNAPSHOT_FILE, request.node.name, request.config)
    # a user property travels with the test's report, also from pytest-xdist workers, to the summary
    request.node.user_properties.append(("snapshot", "compared"))
    return snapshot.use_extension(extension)


@pytest.fixture
def record_gate(request):
    """Records a case's headline gate (its p-value and verdict) on the test's report, which travels from
    pytest-xdist workers too, for the run's joint verdict in the terminal summary."""
    def record(case_id: str, comparison) -> None:
        request.node.user_properties.append(("gate", {
            "case": case_id, "p_value": comparison.p_value, "verdict": comparison.verdict.status,
            "reason": comparison.verdict.reason, "retention": comparison.retention, "interval": comparison.interval,
            "detectable_drop": comparison.extra.get("detectable_drop")}))
    return record


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    gates = {value["case"]: value for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == "gate"}
    if gates:
        from quant.gate import joint_verdict

        joint = joint_verdict([(g["case"], g["p_value"], g["verdict"]) for g in gates.values()]).line()
        terminalreporter.section("joint verdict")
        terminalreporter.write_line(joint)
        if config.getoption("--gate-summary"):
            with open(config.getoption("--gate-summary"), "a", encoding="utf-8") as summary:
                summary.write(gate_summary(list(gates.values()), joint))
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


def gate_summary(gates: list[dict[str, Any]], joint: str) -> str:
    """The gates that ran as a markdown table, and the joint verdict under it."""
    def number(value: float | None, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["## Merge gate", "", "| case | verdict | retention [95% CI] | detectable drop | reason |",
             "|---|---|---|---|---|"]
    for gate in sorted(gates, key=lambda g: g["case"]):
        interval = f" [{gate['interval'][0]:.3f}, {gate['interval'][1]:.3f}]" if gate["interval"] else ""
        lines.append(f"| {gate['case']} | {gate['verdict']} | {number(gate['retention'])}{interval} | "
                     f"{number(gate['detectable_drop'])} | {gate['reason']} |")
    return "\n".join([*lines, "", f"**{joint}**", ""]) + "\n"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``case`` runs once per matrix case, with ids like smollm2-135m-rtn-w4g128-boolq."""
    if "case" not in metafunc.fixturenames:
        return
    params = []
    for case in _matrix(metafunc.config).cases:
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
    if config.getoption("dist") != "loadgroup" or MATRIX not in config.stash:
        return None
    return _model_group_scheduling()(config, log, _matrix(config).models)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected, so that --plan shows what would run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if MATRIX not in config.stash:
        return
    # Slow cadence (llm-compressor's per-config cadence): run when -m names it, else reported as skipped.
    if "slow" not in (config.getoption("-m") or ""):
        skip_slow = pytest.mark.skip(reason="slow cadence: select with -m slow (e.g. -m 'gpu and slow')")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    from quant.snapshots import local_device

    if local_device() != "cuda":
        skip = pytest.mark.skip(reason="gpu tier: CUDA is not available on this machine (torch.cuda.is_available() is False)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # A case whose library backend is not installed skips with the install command (an optional extra).
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case and case.quant.backend:
            from quant.backends import BackendUnavailable, get_backend
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
    from quant import plan
    from quant.pipeline import Workbench
    from quant.snapshots import local_device

    selected = [item.callspec.params["case"] for item in items if hasattr(item, "callspec")
                and "case" in item.callspec.params and not any(m.name == "skip" and "slow" in m.kwargs.get(
                    "reason", "") for m in item.iter_markers())]
    cases = list({case.id: case for case in selected}.values())
    write = config.pluginmanager.get_plugin("terminalreporter").write_line
    matrix, profile = _matrix(config), config.getoption("--profile")
    workbench = Workbench(matrix, profile, data_dir(config.getoption("--data-dir")), local_device())
    for tier in ("cpu", "gpu"):
        own = [case for case in cases if case.model.tier == tier]
        if own:
            write(plan.describe(matrix, own, profile, tier, config.stash[PROJECT].baselines,
                                config.getoption("--hardware") if tier == "gpu" else None,
                                plan.cached_spreads(workbench, own)))
