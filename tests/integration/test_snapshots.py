"""Snapshot baselines: direction-aware tolerances, exact identities, and the syrupy extension's files and failures."""
import json
import os
import subprocess
import sys
import types

import pytest

from quant.config import ConfigError
from quant.project import BASELINES_ENV
from quant.snapshots import check_hardware, record, regressions
from tests.helpers.repo import REPO_ROOT
from quant.pytest_plugin import RECORDED, FirstRecording

TOLERANCES = {"perplexity": {"rel": 0.01}, "accuracy": {"items": 1}}


def _record(perplexity=50.0, accuracy=0.5, model_bytes=1000, n=20):
    return record({"n": n, "model_bytes": model_bytes},
                  {"quantized.perplexity": perplexity, "quantized.accuracy": accuracy}, TOLERANCES)


def test_within_tolerance_or_better_is_not_a_regression():
    stored = _record()
    assert regressions(stored, _record(perplexity=50.4)) == []  # +0.8% < 1%
    assert regressions(stored, _record(accuracy=0.45)) == []    # one item of 20
    assert regressions(stored, _record(perplexity=30.0, accuracy=0.9)) == []  # better is not a regression


def test_a_drop_beyond_tolerance_names_old_new_and_tolerance():
    problems = regressions(_record(), _record(perplexity=51.0, accuracy=0.35))
    assert len(problems) == 2
    assert problems[0].startswith("quantized.accuracy: 0.5 -> 0.35 (lower is worse)")
    assert '{"items": 1} allows 0.05' in problems[0]
    assert problems[1].startswith("quantized.perplexity: 50.0 -> 51.0 (higher is worse)")
    assert '{"rel": 0.01} allows 0.5' in problems[1]


def test_a_baseline_that_moves_either_way_beyond_tolerance_is_a_regression():
    """A task change that raises the baseline (capitalised choices, another extraction) moved the gates' reference."""
    def baseline(accuracy):
        return record({"n": 20}, {"baseline.accuracy": accuracy, "quantized.accuracy": accuracy}, TOLERANCES)

    assert regressions(baseline(0.5), baseline(0.54)) == regressions(baseline(0.5), baseline(0.46)) == []
    problems = regressions(baseline(0.5), baseline(0.6))
    assert len(problems) == 1 and problems[0].startswith("baseline.accuracy: 0.5 -> 0.6 (the baseline must not move)")


def test_identities_must_not_move_and_metrics_must_not_vanish():
    changed = _record(model_bytes=1001)
    del changed["metrics"]["quantized.accuracy"]
    problems = regressions(_record(), changed)
    assert "model_bytes: must not change: snapshot 1000, now 1001" in problems
    assert any(p.startswith("quantized.accuracy: in the snapshot") for p in problems)


def test_a_metric_without_tolerance_must_match_exactly():
    stored = record({}, {"baseline.mrr@10": 0.5}, {})
    assert regressions(stored, record({}, {"baseline.mrr@10": 0.5}, {})) == []
    assert regressions(stored, record({}, {"baseline.mrr@10": 0.49}, {}))


SNAPSHOT_TEST = """
import pytest
from quant.snapshots import record
from quant.pytest_plugin import MetricsSnapshotExtension

@pytest.fixture
def metrics_snapshot(snapshot):
    folder = {folder!r}
    return snapshot.use_extension(type("Bound", (MetricsSnapshotExtension,), {{"directory": folder}}))

def test_case(metrics_snapshot):
    assert metrics_snapshot == record({{"n": 6}}, {{"quantized.perplexity": {perplexity}}}, {{"perplexity": {{"rel": 0.01}}}})
"""


def _run(pytester, folder, perplexity, *args):
    pytester.makepyfile(test_quantizer=SNAPSHOT_TEST.format(folder=str(folder), perplexity=perplexity))
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def test_syrupy_extension_records_compares_and_explains(pytester, tmp_path):
    folder = tmp_path / "baselines" / "cpu" / "test"
    _run(pytester, folder, 50.0, "--snapshot-update").assert_outcomes(passed=1)
    stored = json.loads((folder / "test_quantizer.json").read_text())
    assert stored["test_case"]["metrics"]["quantized.perplexity"]["value"] == 50.0

    _run(pytester, folder, 50.2).assert_outcomes(passed=1)  # within 1%
    result = _run(pytester, folder, 53.0)  # a quantizer change that costs 6% perplexity
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*quantized.perplexity: 50.0 -> 53.0 (higher is worse)*tolerance*allows 0.5*"])
    # an update within tolerance leaves the committed file alone (no churn in review)
    before = (folder / "test_quantizer.json").read_bytes()
    _run(pytester, folder, 50.2, "--snapshot-update").assert_outcomes(passed=1)
    assert (folder / "test_quantizer.json").read_bytes() == before


def test_a_first_run_on_new_hardware_records_the_case_and_lists_it(tmp_path):
    location = tmp_path / "h100" / "test" / "test_matrix.json"
    entry = {"exact": {"n": 4}, "metrics": {"quantized.perplexity": {"value": 9.5, "worse": "higher", "tolerance": {}}}}
    session = types.SimpleNamespace(stash=pytest.Stash())  # not this session's: its summary would list the file
    assert FirstRecording(location, "test_snapshot[case]", session) == entry
    assert json.loads(location.read_text()) == {"test_snapshot[case]": entry}
    assert session.stash[RECORDED] == [(location, "test_snapshot[case]")]


def test_every_change_is_listed_not_only_the_first():
    """A new identity, a vanished one, a new metric and a vanished one: four problems, each named."""
    stored = record({"items": "abc", "config": "x"}, {"quantized.accuracy": 0.5, "baseline.accuracy": 0.6}, {})
    current = record({"items": "abc", "model_bytes": 10}, {"quantized.accuracy": 0.5, "quantized.mrr@10": 0.4}, {})
    problems = regressions(stored, current)
    assert problems == [
        "config: must not change: snapshot 'x', now None",
        "model_bytes: must not change: snapshot None, now 10",
        "baseline.accuracy: in the snapshot (0.6) but no longer measured",
        "quantized.mrr@10: measured (0.4) but not in the snapshot (run pytest --snapshot-update to record it)",
    ]


def test_an_absolute_tolerance_alone_allows_that_much():
    tolerance = {"perplexity": {"abs": 0.5}}
    stored = record({}, {"quantized.perplexity": 50.0}, tolerance)
    assert regressions(stored, record({}, {"quantized.perplexity": 50.4}, tolerance)) == []
    assert regressions(stored, record({}, {"quantized.perplexity": 50.6}, tolerance))


def test_the_side_is_read_before_the_first_dot_only():
    """`baseline.correct_strict-match` style names: a metric with dots of its own stays one metric."""
    entry = record({}, {"baseline.ndcg@10.dl19": 0.5}, {"ndcg@10.dl19": {"abs": 0.1}})["metrics"]["baseline.ndcg@10.dl19"]
    assert entry["worse"] == "either" and entry["tolerance"] == {"abs": 0.1}
    assert record({}, {"mean_kld": 0.3}, {})["metrics"]["mean_kld"]["worse"] == "higher"


def test_hardware_class_names_the_gpu_model(monkeypatch):
    from quant import snapshots

    assert snapshots.hardware_class("cpu") == "cpu"
    for name, expected in [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-40GB", "a100"),
                           ("NVIDIA L4", "l4"), ("Tesla T4", "t4"), ("Some Accelerator", "accelerator")]:
        monkeypatch.setattr(snapshots.torch.cuda, "get_device_name", lambda name=name: name)
        assert snapshots.hardware_class("cuda:0") == expected, name


def _snapshot_run(baselines, *args: str) -> subprocess.CompletedProcess:
    """The repository's own snapshot test of one cheap case, with baselines/ at ``baselines``."""
    command = [sys.executable, "-m", "pytest", "matrix.yaml::test_snapshot[smollm2-135m-rtn-w8-wikitext]",
               "-p", "no:cacheprovider", "--benchmark-skip", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, BASELINES_ENV: str(baselines)},
                          capture_output=True, text=True, timeout=600)


def test_new_hardware_fails_until_recorded_on_purpose_then_compares(tmp_path, shared_data):
    """No baselines/<hardware>/: the snapshot test fails and names the recording flag; with the flag it records
    and lists what it recorded; the next run compares with what was recorded."""
    unrecorded = _snapshot_run(tmp_path)
    assert unrecorded.returncode == 1, unrecorded.stdout[-2000:]
    assert "no snapshot baselines for hardware 'cpu'" in unrecorded.stdout and "--record-baselines" in unrecorded.stdout
    assert "no snapshot was compared" in unrecorded.stdout
    recording = _snapshot_run(tmp_path, "--record-baselines")
    assert recording.returncode == 0, recording.stdout[-2000:]
    assert "recorded test_snapshot[smollm2-135m-rtn-w8-wikitext]" in recording.stdout
    stored = json.loads((tmp_path / "cpu" / "test" / "test_matrix.json").read_text())
    assert list(stored) == ["test_snapshot[smollm2-135m-rtn-w8-wikitext]"]
    compared = _snapshot_run(tmp_path)
    assert compared.returncode == 0 and "no snapshot was compared" not in compared.stdout, compared.stdout[-2000:]


@pytest.mark.parametrize("name", ["h10O", "H100", "h100_replica", "h100/x", "100"])
def test_a_misspelt_hardware_name_is_refused(name):
    with pytest.raises(ConfigError, match=f"--hardware '{name}': not a hardware name"):
        check_hardware(name, None)


def test_a_hardware_name_must_fit_this_gpu():
    assert check_hardware("h200-replica-small", "h200") == "h200-replica-small"
    with pytest.raises(ConfigError, match="this machine's GPU is h200"):
        check_hardware("h100-replica", "h200")


def test_pytest_refuses_a_misspelt_hardware_before_running_anything():
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "--hardware", "h10O", "tests/integration/test_snapshots.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4 and "--hardware 'h10O': not a hardware name" in result.stderr, result.stderr
