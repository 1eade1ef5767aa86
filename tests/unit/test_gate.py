"""The gate's rule (quant/gate.py): retention intervals against the threshold, the informative rule's fallback,
strictness, the divergence bounds on top, and the joint verdict over a run (Holm)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from quant import gate, stats
from quant.kinds import TaskResult


def test_retention_of_a_zero_baseline_is_undefined():
    assert stats.retention(0.0, 0.1, lower_is_better=False) is None
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


def test_holm_rejects_step_down_and_stops_at_the_first_kept_hypothesis():
    # m = 4: 0.005 <= 0.025/4 and 0.008 <= 0.025/3 are rejected, then 0.013 > 0.025/2 stops it, so 0.02 is kept
    # although it is below 0.025/1
    p_values = {"a": 0.008, "b": 0.005, "c": 0.02, "d": 0.013}
    assert stats.holm(p_values, 0.025) == ["b", "a"]
    assert stats.holm({"a": 0.03}, 0.025) == [] and stats.holm({}, 0.025) == []
    assert stats.holm({"a": 0.025}, 0.025) == ["a"]  # at the level rejects, as the per-case rule's bound


def test_one_gate_that_fails_only_before_correction_leaves_the_change_passing():
    """Five informative gates; one's own p-value (0.02) is below 0.025, so its case fails on its own, but after
    Holm's correction over the five it needs 0.005: the joint verdict passes and says one failed before it."""
    gates = [("m-rtn-wikitext", 0.02, "fail")] + [(f"m-q{i}-wikitext", 0.6, "pass") for i in range(4)]
    joint = gate.joint_verdict(gates)
    assert joint.status == "pass" and joint.failing == [] and joint.failing_uncorrected == ["m-rtn-wikitext"]
    assert joint.line() == "this change: pass, 0 of 5 informative gates fail after Holm's correction (1 before it)"
    strong = gate.joint_verdict([("m-rtn-wikitext", 0.0005, "fail")] + gates[1:])
    assert strong.status == "fail" and strong.failing == ["m-rtn-wikitext"]
    assert strong.line().startswith("this change: fail, 1 of 5 informative gates fail after Holm's correction: m-rtn")


def test_fails_outside_the_combination_count_on_their_own():
    """An uninformative row failing its fallback signal has no p-value; an informative one failing a KLD bound has
    an unremarkable one: both fail the change beside the combination."""
    joint = gate.joint_verdict([("m-a-boolq", None, "fail"), ("m-a-wikitext", 0.4, "fail"), ("m-b-boolq", None,
                                                                                               "uninformative")])
    assert joint.status == "fail" and joint.gates == 1 and joint.other_fails == ["m-a-boolq", "m-a-wikitext"]
    assert joint.line().endswith("; 2 cases fail on a bound outside it: m-a-boolq, m-a-wikitext")
    assert gate.joint_verdict([("m-b-boolq", None, "uninformative")]).line() == (
        "this change: no informative gate ran, nothing to combine")


def test_the_bootstrap_p_value_agrees_with_the_interval():
    """p <= 0.025 about when the interval's upper bound lies below the threshold; never 0."""
    ratios = np.linspace(0.80, 0.90, 1001)
    low, high = stats.interval_of(ratios)
    assert stats.p_at_least(ratios, high + 1e-3) < 0.025 < stats.p_at_least(ratios, high - 5e-3)
    assert stats.p_at_least(ratios, 2.0) == pytest.approx(1 / 1002)


def _agreement_for(retention: float, accuracy: float) -> float:
    """The per-item agreement at which a candidate's expected accuracy is ``retention`` x the baseline's:
    accuracy * a + (1 - accuracy) * (1 - a) = retention * accuracy."""
    return (retention * accuracy - (1 - accuracy)) / (2 * accuracy - 1)


def test_the_detectable_drop_is_failed_80_percent_of_the_time_in_simulation():
    """Paired runs of 300 items (baseline accuracy 0.8) at the true retention 1 - detectable_drop: the gate (its
    bootstrap interval against 0.9) fails about 80% of them. 400 runs: Monte Carlo sd 0.02, so 0.72-0.88."""
    rng = np.random.default_rng(11)
    n, accuracy, threshold = 300, 0.8, 0.9
    accuracy_of = lambda c: c["correct"].mean(-1)  # noqa: E731

    def draw(retention: float) -> tuple[dict, dict]:
        base = rng.random(n) < accuracy
        quant = np.where(rng.random(n) < _agreement_for(retention, accuracy), base, ~base)
        return {"correct": base.astype(float)}, {"correct": quant.astype(float)}

    # the per-item spread at the alternative, from pilot runs (as the gate measures it from one run's bootstrap)
    retention = 0.8
    for _ in range(2):
        spreads = [stats.bootstrap_retentions(*draw(retention), accuracy_of, lower_is_better=False, resamples=400,
                                              seed=i).std() * np.sqrt(n) for i in range(50)]
        retention = 1 - gate.detectable_drop(float(np.mean(spreads)), n, threshold)
    fails = 0
    for run in range(400):
        ratios = stats.bootstrap_retentions(*draw(retention), accuracy_of, lower_is_better=False, resamples=400,
                                            seed=run)
        fails += stats.interval_of(ratios)[1] < threshold
    assert 0.72 <= fails / 400 <= 0.88, (retention, fails / 400)


def test_items_to_detect_inverts_the_detectable_drop():
    n = gate.items_to_detect(0.2, 1.5, 0.9)
    assert gate.detectable_drop(1.5, n, 0.9) <= 0.2 < gate.detectable_drop(1.5, n - 1, 0.9)
    assert gate.items_to_detect(0.05, 1.5, 0.9) is None  # within the threshold's own margin: never failed


# ---- sequential gates (gate.settle) ---------------------------------------------------------------------------

SIZES = [16, 32, 64, 128, 256, 512]  # ResultStore.looks for a profile of 512 items
# the simulation's per-item spread of the paired retention at the threshold is 0.50 (``_population_spread``)
GATE = {"retention_min": 0.9, "strict": False, "kld_max": None, "same_top_min": None, "spread_prior": {"boolq": 0.5}}


def _comparison(retention: float, spread: float, n: int, gate_fields: dict | None = None,
                metrics: dict | None = None, p_value: float | None = 0.5) -> gate.Comparison:
    """What ``gate.settle`` reads from a judged comparison: the retention, its per-item spread and n."""
    case = SimpleNamespace(gate={**GATE, **(gate_fields or {})}, task=SimpleNamespace(name="boolq"))
    baseline = TaskResult("t", {"accuracy": 0.6}, [{}] * n)
    candidate = TaskResult("t", {"accuracy": 0.6 * retention, **(metrics or {})}, [{}] * n)
    return gate.Comparison(case, "accuracy", baseline, candidate, retention, None, gate.Verdict("pass", "fixed"),
                           {"spread": spread}, p_value)


def _sequential_runs(retention: float, runs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paired accuracy items (baseline right 60% of the time; a candidate that keeps a right answer with the
    probability giving ``retention`` and turns 5% of wrong ones right) judged look by look by ``gate.settle``, the
    retention's standard error from the delta method: (verdict of each run, items it read, whether the fixed test
    at every item fails it)."""
    rng = np.random.default_rng(seed)
    base = rng.random((runs, SIZES[-1])) < 0.6
    keep = (0.6 * retention - 0.4 * 0.05) / 0.6
    quant = np.where(base, rng.random(base.shape) < keep, rng.random(base.shape) < 0.05)
    verdicts, items, fixed = [], [], []
    for b, q in zip(base.astype(float), quant.astype(float)):
        decided = None
        for look, n in enumerate(SIZES):
            value = q[:n].mean() / b[:n].mean()
            spread = (q[:n] - value * b[:n]).std() / b[:n].mean()
            settled = None if decided else gate.settle(_comparison(value, spread, n), SIZES, look)
            decided = decided or (settled and (settled.verdict.status, n))
        verdicts.append(decided[0])
        items.append(decided[1])
        fixed.append((value - 0.9) / (spread / math.sqrt(n)) <= -gate.Z_GATE)
    return np.array(verdicts), np.array(items), np.array(fixed)


def _population_spread(retention: float) -> float:
    keep = (0.6 * retention - 0.4 * 0.05) / 0.6
    # per-item variance of q - R b: (1 - R)^2 when right and kept, R^2 when right and lost, 1 on a wrong-to-right
    variance = 0.6 * (keep * (1 - retention) ** 2 + (1 - keep) * retention**2) + 0.4 * 0.05
    return math.sqrt(variance - (0.6 * keep + 0.4 * 0.05 - retention * 0.6) ** 2) / 0.6


def test_the_sequential_gate_errs_at_its_nominal_rates_on_the_threshold():
    """At a retention exactly on the threshold, over 6 looks: a fail as often as a one-sided 2.5% test allows, and a
    pass about as often (3000 simulated runs; 3 Monte Carlo standard errors)."""
    verdicts, _, _ = _sequential_runs(0.9, 3000, seed=1)
    tolerance = 3 * math.sqrt(0.025 * 0.975 / 3000)
    assert abs((verdicts == "fail").mean() - 0.025) <= tolerance
    assert abs((verdicts == "pass").mean() - 0.025) <= tolerance


def test_the_sequential_gate_keeps_its_power_and_stops_early_on_a_clear_drop():
    """At the fixed test's detectable drop it fails within 3 points as often as the fixed test on every item does
    (both under the 80% the drop is computed for: the spread grows as answers are lost); at twice that drop it fails
    every run, at a fraction of the items; a clean model passes early (simulated runs)."""
    drop = gate.detectable_drop(_population_spread(0.9), SIZES[-1], 0.9)
    verdicts, _, fixed = _sequential_runs(1 - drop, 2000, seed=2)
    assert (verdicts == "fail").mean() >= fixed.mean() - 0.03
    verdicts, items, _ = _sequential_runs(1 - 2 * drop, 500, seed=3)
    assert (verdicts == "fail").all() and items.mean() <= SIZES[-1] / 2
    verdicts, items, _ = _sequential_runs(1.0, 500, seed=4)
    assert (verdicts == "pass").mean() >= 0.95 and items.mean() <= SIZES[-1] * 0.75


def test_a_sequential_gate_decides_at_a_boundary_and_says_where():
    design = stats.GroupSequential([n / 512 for n in SIZES], gate.JOINT_ALPHA)
    boundary = design.boundaries[2]
    spread = 0.5
    just_below = 0.9 - (boundary + 0.01) * spread / math.sqrt(64)
    failed = gate.settle(_comparison(just_below, spread, 64), SIZES, 2)
    assert failed.verdict.status == "fail" and "look 3 of 6 (n=64 of 512)" in failed.verdict.reason
    assert failed.p_value == pytest.approx(design.p_value(2, -boundary - 0.01)) and failed.p_value < 0.025
    assert gate.settle(_comparison(0.9 - (boundary - 0.01) * spread / math.sqrt(64), spread, 64), SIZES, 2) is None
    last = gate.settle(_comparison(0.89, spread, 512), SIZES, 5)
    assert last.verdict.status == "inconclusive" and "within the boundaries" in last.verdict.reason
    assert gate.settle(_comparison(0.89, spread, 512, {"strict": True}), SIZES, 5).verdict.status == "fail"


def test_what_a_sequential_gate_does_not_stop_on():
    # an uninformative gate (no p-value: its baseline is near chance) reads every item and keeps its fixed verdict
    assert gate.settle(_comparison(0.5, 0.5, 64, p_value=None), SIZES, 2) is None
    fixed = _comparison(0.5, 0.5, 512, p_value=None)
    assert gate.settle(fixed, SIZES, 5) is fixed
    # a single look is the fixed gate
    assert gate.settle(fixed, [512], 0) is fixed
    # a divergence bound over its limit holds back an early pass; it fails the case at the last look
    over = {"mean_kld": 0.9, "same_top_p": 0.9}
    assert gate.settle(_comparison(1.0, 0.05, 64, {"kld_max": 0.5}, over), SIZES, 2) is None
    last = gate.settle(_comparison(1.0, 0.05, 512, {"kld_max": 0.5}, over), SIZES, 5)
    assert last.verdict.status == "fail" and "mean KLD" in last.verdict.reason
