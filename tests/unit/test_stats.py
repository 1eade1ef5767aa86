"""Paired statistics for the gate (quant/stats.py), tested as statistics as well as code: the bootstrap's coverage
and pairing on simulated runs, McNemar, flips, ROC-AUC, majority rates, correlation."""

import numpy as np
import pytest

from quant import stats


def test_mcnemar_exact_matches_the_binomial_test():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_roc_auc_and_majority_rate():
    assert stats.roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert stats.roc_auc([1, 1], [True, False]) == 0.5
    assert stats.majority_rate([True] * 3 + [False]) == 0.75
    assert stats.majority_rate([0, 0, 1, 1]) == 0.5


ACCURACY_OF = lambda columns: columns["correct"].mean(-1)  # noqa: E731  (choice's accuracy from its column)


def _columns(correct) -> dict[str, np.ndarray]:
    return {"correct": np.array(correct, dtype=float)}


def test_retention_interval_contains_the_estimate_and_is_seeded():
    base = _columns([True] * 60 + [False] * 40)
    quant = _columns([True] * 50 + [False] * 10 + [True] * 5 + [False] * 35)
    value = stats.retention(0.60, 0.55, lower_is_better=False)
    low, high = stats.retention_interval(base, quant, ACCURACY_OF, lower_is_better=False)
    assert low < value < high
    assert (low, high) == stats.retention_interval(base, quant, ACCURACY_OF, lower_is_better=False)
    assert stats.flips(base["correct"], quant["correct"]) == {"correct_to_wrong": 10, "wrong_to_correct": 5}


def test_retention_of_a_lower_is_better_metric_is_inverted():
    assert stats.retention(10.0, 12.5, lower_is_better=True) == pytest.approx(0.8)
    nll = lambda c: c["nll"].mean(-1)  # noqa: E731
    low, high = stats.retention_interval({"nll": np.array([2.0])}, {"nll": np.array([2.5])}, nll,
                                         lower_is_better=True, resamples=20)
    assert low == high == pytest.approx(0.8)


def test_the_bootstrap_resamples_every_item_with_replacement():
    """One item in 100 differs: resampling must sometimes leave it out (retention 1) and sometimes draw it twice."""
    low, high = stats.retention_interval(_columns([True] * 100), _columns([False] + [True] * 99), ACCURACY_OF,
                                         lower_is_better=False)
    assert low <= 0.98 and high == 1.0


def test_agreement_and_correlation():
    assert stats.agreement([1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    assert stats.agreement(["d1"], ["d2"]) == 0.0
    with pytest.raises(ValueError):
        stats.agreement([1, 0], [1])
    base, quant = [1.0, 2.0, 4.0], [2.0, 4.0, 8.0]
    assert stats.correlation(base, quant) == pytest.approx(1.0)
    assert stats.correlation(base, [-q for q in quant]) == pytest.approx(-1.0)
    assert stats.correlation(base, [1.0, 1.0, 1.0]) == 0.0  # a constant score


def _paired_draw(rng: np.random.Generator, n: int, accuracy: float, agreement: float) -> tuple[dict, dict]:
    """Per-item correctness of a baseline at ``accuracy`` and a candidate that gives the baseline's outcome on each
    item with probability ``agreement`` and the other one otherwise: the paired structure of a quantized model."""
    base = rng.random(n) < accuracy
    quant = np.where(rng.random(n) < agreement, base, ~base)
    return _columns(base), _columns(quant)


def _unpaired_interval(baseline: dict, quantized: dict, seed: int) -> tuple[float, float]:
    """The interval a bootstrap that resamples each model's items on its own would give (what the gate must not
    do: it ignores that both models answered the same questions)."""
    rng = np.random.default_rng(seed)
    base, quant = baseline["correct"], quantized["correct"]
    draws = lambda: rng.integers(0, len(base), (stats.BOOTSTRAP_RESAMPLES, len(base)))  # noqa: E731
    low, high = np.percentile(quant[draws()].mean(-1) / base[draws()].mean(-1), [2.5, 97.5])
    return float(low), float(high)


# 300 items, a baseline at 0.6 and a candidate that agrees on 90% of them: retention (0.6 * 0.9 + 0.4 * 0.1) / 0.6
N_ITEMS, ACCURACY, AGREEMENT = 300, 0.6, 0.9
TRUE_RETENTION = (ACCURACY * AGREEMENT + (1 - ACCURACY) * (1 - AGREEMENT)) / ACCURACY


def test_the_retention_interval_covers_the_true_retention_95_percent_of_the_time():
    """Over 1000 simulated paired runs at a known retention, the 95% interval holds it in 93-97% of them (Monte
    Carlo error of a 0.95 rate over 1000 draws: 0.007). Measured: 0.942. An unpaired bootstrap covers ~100%."""
    rng = np.random.default_rng(2026)
    covered = 0
    for draw in range(1000):
        low, high = stats.retention_interval(*_paired_draw(rng, N_ITEMS, ACCURACY, AGREEMENT), ACCURACY_OF,
                                             lower_is_better=False, seed=draw)
        covered += low <= TRUE_RETENTION <= high
    assert 0.93 <= covered / 1000 <= 0.97, covered / 1000


def test_the_paired_interval_is_narrower_than_an_unpaired_one_when_the_models_agree():
    """What the two models share cancels in the paired resample: measured 0.118 against 0.26 mean width."""
    rng = np.random.default_rng(7)
    paired, unpaired = [], []
    for draw in range(100):
        baseline, quantized = _paired_draw(rng, N_ITEMS, ACCURACY, AGREEMENT)
        low, high = stats.retention_interval(baseline, quantized, ACCURACY_OF, lower_is_better=False, seed=draw)
        paired.append(high - low)
        low, high = _unpaired_interval(baseline, quantized, draw)
        unpaired.append(high - low)
    assert np.mean(paired) < 0.6 * np.mean(unpaired), (np.mean(paired), np.mean(unpaired))


def test_flips_roc_auc_and_pairing_read_every_item():
    assert stats.flips(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == {"correct_to_wrong": 0, "wrong_to_correct": 1}
    assert stats.roc_auc([0.2, 0.9, 0.4], [True, False, False]) == 0.0  # the positive ranks below both negatives
    assert stats.roc_auc([0.9, 0.1, 0.5], [True, False, False]) == 1.0
    assert stats.roc_auc([0.9, 0.8], [True, True]) is None
    assert stats.mcnemar_exact(1, 0) == 1.0
    records = [{"id": "a"}, {"id": "b"}]
    stats.same_items(records, records)
    with pytest.raises(ValueError, match="same items in the same order"):
        stats.same_items(records, list(reversed(records)))


def test_the_spending_boundaries_are_the_published_obrien_fleming_type_ones():
    """Lan-DeMets O'Brien-Fleming-type spending, one-sided 0.025, four equally spaced looks: 4.333, 2.963, 2.359,
    2.014 (Jennison & Turnbull's tables; rpact and gsDesign give the same); one look is the fixed test's 1.960."""
    design = stats.GroupSequential([0.25, 0.5, 0.75, 1.0], 0.025)
    assert design.boundaries == pytest.approx([4.333, 2.963, 2.359, 2.014], abs=2e-3)
    assert stats.GroupSequential([1.0], 0.025).boundaries == pytest.approx([1.95996], abs=1e-4)
    # each look spends what the function allows up to it: the p-value at a boundary is the alpha spent so far
    spent = [design.p_value(k, -c) for k, c in enumerate(design.boundaries)]
    assert spent == pytest.approx([stats.spent_alpha(t, 0.025) for t in design.fractions], abs=2e-4)
    assert spent[-1] == pytest.approx(0.025, abs=2e-4)


def test_the_stagewise_p_value_is_uniform_under_the_null():
    """Simulated null sequences (standard Brownian motion at the looks) stopped at their first crossing: the
    stage-wise p-value is below 0.01, 0.025 and 0.1 as often as it should be (5000 sequences, 3 standard errors)."""
    fractions = [16 / 200, 32 / 200, 64 / 200, 128 / 200, 1.0]
    design = stats.GroupSequential(fractions, 0.025)
    rng = np.random.default_rng(7)
    steps = rng.standard_normal((5000, len(fractions))) * np.sqrt(np.diff([0, *fractions]))
    z = np.cumsum(steps, axis=1) / np.sqrt(fractions)
    crossed = z <= -np.array(design.boundaries)
    stop = np.where(crossed.any(axis=1), crossed.argmax(axis=1), len(fractions) - 1)
    p = np.empty(len(z))
    for look in range(len(fractions)):
        p[stop == look] = design.p_values(look, z[stop == look, look])
    for level in (0.01, 0.025, 0.1):
        assert abs((p <= level).mean() - level) <= 3 * np.sqrt(level * (1 - level) / 5000), level


def test_looks_must_increase():
    with pytest.raises(ValueError, match="increase"):
        stats.GroupSequential([0.5, 0.5, 1.0], 0.025)


def test_the_expected_stop_is_early_for_a_clear_effect_and_late_under_the_null():
    design = stats.GroupSequential([0.25, 0.5, 0.75, 1.0], 0.025)
    assert design.expected_fraction(20.0) == 0.25  # far beyond every boundary: the first look
    assert design.expected_fraction(0.0) > 0.97  # under the null almost every sequence reaches the end
    assert 0.5 < design.expected_fraction(4.0) < 0.9
