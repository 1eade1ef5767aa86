"""The gate's rule (quant/gate.py): retention intervals against the threshold, the informative rule's fallback,
strictness, and the divergence bounds on top."""
import pytest

from quant import gate, stats


def test_retention_of_a_zero_baseline_is_undefined():
    assert stats.retention(0.0, 0.1, "accuracy") is None
    verdict = gate.retention_verdict("accuracy", 0.0, 0.0, None, 40, 0.9, informative=True)
    assert verdict.status == "uninformative" and "undefined" in verdict.reason


@pytest.mark.parametrize("interval,strict,status", [
    ((0.70, 0.85), False, "fail"), ((0.92, 1.05), False, "pass"),
    ((0.85, 0.95), False, "inconclusive"), ((0.85, 0.95), True, "fail"),
])
def test_gate_rules(interval, strict, status):
    verdict = gate.retention_verdict("accuracy", 0.5, 0.46, interval, 100, 0.9, informative=True, strict=strict)
    assert verdict.status == status
    if status == "inconclusive":
        assert "n=100" in verdict.reason and "would settle it" in verdict.reason


def test_uninformative_rows_are_gated_on_the_fallback_signal():
    keep = gate.retention_verdict("accuracy", 0.5, 0.1, (0.1, 0.3), 50, 0.9, informative=False,
                       fallback=("score correlation", 0.8, 0.3))
    drop = gate.retention_verdict("accuracy", 0.5, 0.5, (0.9, 1.1), 50, 0.9, informative=False,
                       fallback=("score correlation", 0.1, 0.3))
    assert keep.status == "uninformative" and drop.status == "fail"


def test_divergence_bounds_turn_a_pass_into_a_fail():
    passed = gate.Verdict("pass", "ok")
    metrics = {"mean_kld": 0.5, "same_top_p": 0.6}
    assert gate.judge_divergence(passed, metrics, 0.1, None).failed
    assert gate.judge_divergence(passed, metrics, None, 0.8).failed
    assert not gate.judge_divergence(passed, metrics, 1.0, 0.5).failed


def test_gate_boundaries_and_reasons():
    no_interval = gate.retention_verdict("accuracy", 0.5, 0.45, None, 40, 0.9, informative=True)
    assert no_interval.status == "pass" and "0.900" in no_interval.reason  # retention exactly at the threshold
    assert gate.retention_verdict("accuracy", 0.5, 0.44, None, 40, 0.9, informative=True).status == "fail"
    # Perplexity retention is inverted: 10 -> 11 retains 0.909, which fails 0.95.
    assert gate.retention_verdict("perplexity", 10.0, 11.0, None, 40, 0.95, informative=True).status == "fail"
    assert gate.retention_verdict("accuracy", 0.5, 0.46, (0.80, 0.90), 100, 0.9, informative=True).status == "inconclusive"
    at_low = gate.retention_verdict("accuracy", 0.5, 0.46, (0.90, 0.95), 100, 0.9, informative=True)
    assert at_low.status == "pass" and "[0.900, 0.950]" in at_low.reason
    below = gate.retention_verdict("accuracy", 0.5, 0.40, (0.70, 0.85), 100, 0.9, informative=True)
    assert "[0.700, 0.850]" in below.reason and "below" in below.reason
    # the items that would settle it: n x (half-width / distance to the threshold)^2 = 100 x (0.05 / 0.02)^2
    settle = gate.retention_verdict("accuracy", 0.5, 0.44, (0.83, 0.93), 100, 0.9, informative=True)
    assert "n=625" in settle.reason, settle.reason
    straddle = gate.retention_verdict("accuracy", 0.5, 0.44, (0.83, 0.93), 100, 0.9, informative=True, strict=True)
    assert straddle.status == "fail" and "strict" in straddle.reason
    at_minimum = gate.retention_verdict("accuracy", 0.5, 0.5, None, 50, 0.9, informative=False, fallback=("correlation", 0.3, 0.3))
    assert at_minimum.status == "uninformative" and "correlation: 0.300 >= 0.3" in at_minimum.reason
    below_minimum = gate.retention_verdict("accuracy", 0.5, 0.5, None, 50, 0.9, informative=False, fallback=("correlation", 0.2, 0.3))
    assert "correlation: 0.200 < 0.3" in below_minimum.reason
    assert "not informative" in gate.retention_verdict("accuracy", 0.5, 0.5, None, 50, 0.9, informative=False).reason


def test_divergence_bounds_are_inclusive():
    passed = gate.Verdict("pass", "retention")
    assert gate.judge_divergence(passed, {"mean_kld": 0.5, "same_top_p": 0.8}, 0.5, 0.8) is passed
    failed = gate.judge_divergence(passed, {"mean_kld": 0.6, "same_top_p": 0.8}, 0.5, None)
    assert failed.status == "fail" and "0.6000 > 0.5" in failed.reason
    assert "0.700 < 0.8" in gate.judge_divergence(passed, {"mean_kld": 0.1, "same_top_p": 0.7}, None, 0.8).reason
