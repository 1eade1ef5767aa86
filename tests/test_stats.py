import copy
import math
import types

import numpy as np
import pytest

import torch

from quant import stats
from quant.tasks import TaskSpec, evaluate_perplexity, full_kld


def test_mcnemar_exact_matches_the_binomial_test():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_ranking_metrics():
    assert stats.ndcg_at_k([3, 2, 0], [3, 2, 0], 10) == pytest.approx(1.0)
    assert stats.ndcg_at_k([0, 0, 3], [3, 0, 0], 10) == pytest.approx(1 / 2)  # log2(4) = 2
    # trec_eval: the grade is the gain (not 2^g - 1), and the ideal counts judged passages never ranked
    assert stats.ndcg_at_k([1, 3], [3, 1], 10) == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert stats.ndcg_at_k([2], [2, 2], 10) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert stats.mrr_at_k([False, True], 10) == 0.5
    assert stats.mrr_at_k([False] * 12, 10) == 0.0


def test_roc_auc_and_chance():
    assert stats.roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert stats.roc_auc([1, 1], [True, False]) == 0.5
    assert stats.chance_rate([{"label": True}] * 3 + [{"label": False}]) == 0.75


def _items(correct):
    return [{"id": str(i), "correct": c} for i, c in enumerate(correct)]


def test_retention_interval_contains_the_estimate_and_is_seeded():
    base = _items([True] * 60 + [False] * 40)
    quant = _items([True] * 50 + [False] * 10 + [True] * 5 + [False] * 35)
    value = stats.retention(0.60, 0.55, "accuracy")
    low, high = stats.retention_interval(base, quant, "accuracy")
    assert low < value < high
    assert (low, high) == stats.retention_interval(base, quant, "accuracy")
    assert stats.flips(base, quant) == {"correct_to_wrong": 10, "wrong_to_correct": 5}


def test_retention_of_a_zero_baseline_is_undefined():
    assert stats.retention(0.0, 0.1, "accuracy") is None
    verdict = stats.judge("accuracy", 0.0, 0.0, None, 40, 0.9, informative=True)
    assert verdict.status == "uninformative" and "undefined" in verdict.reason


@pytest.mark.parametrize("interval,strict,status", [
    ((0.70, 0.85), False, "fail"), ((0.92, 1.05), False, "pass"),
    ((0.85, 0.95), False, "inconclusive"), ((0.85, 0.95), True, "fail"),
])
def test_gate_rules(interval, strict, status):
    verdict = stats.judge("accuracy", 0.5, 0.46, interval, 100, 0.9, informative=True, strict=strict)
    assert verdict.status == status
    if status == "inconclusive":
        assert "n=100" in verdict.reason and "would settle it" in verdict.reason


def test_uninformative_rows_are_gated_on_the_fallback_signal():
    keep = stats.judge("accuracy", 0.5, 0.1, (0.1, 0.3), 50, 0.9, informative=False,
                       fallback=("score correlation", 0.8, 0.3))
    drop = stats.judge("accuracy", 0.5, 0.5, (0.9, 1.1), 50, 0.9, informative=False,
                       fallback=("score correlation", 0.1, 0.3))
    assert keep.status == "uninformative" and drop.status == "fail"


def test_perplexity_retention_is_inverted():
    assert stats.retention(10.0, 12.5, "perplexity") == pytest.approx(0.8)


def test_full_kld_is_torchs_kl_divergence_over_the_whole_vocabulary():
    generator = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    q = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    assert torch.allclose(full_kld(p, p), torch.zeros(5), atol=1e-6)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    torch.testing.assert_close(full_kld(p, q), expected)


def test_divergence_bounds_turn_a_pass_into_a_fail():
    passed = stats.Verdict("pass", "ok")
    metrics = {"mean_kld": 0.5, "same_top_p": 0.6}
    assert stats.judge_divergence(passed, metrics, 0.1, None).failed
    assert stats.judge_divergence(passed, metrics, None, 0.8).failed
    assert not stats.judge_divergence(passed, metrics, 1.0, 0.5).failed


@torch.no_grad()
def test_perplexity_reports_llama_cpps_kld_statistics_over_the_full_vocabulary(tiny_llama):
    class CharacterTokenizer:  # the text's characters as token ids: a tokenizer without a download
        def __call__(self, text, **_):
            return types.SimpleNamespace(input_ids=[ord(c) % 128 for c in text])

    task = TaskSpec("wikitext", "wikitext", "perplexity", "perplexity", {"window": 32, "batch_size": 2})
    items = [{"id": "wiki", "text": "The quick brown fox jumps over the lazy dog. " * 4}]
    same = evaluate_perplexity(tiny_llama, CharacterTokenizer(), task, items, reference_model=tiny_llama)
    assert same.metrics["mean_kld"] == pytest.approx(0, abs=1e-6) and same.metrics["same_top_p"] == 1.0
    assert same.metrics["ln_ppl_ratio"] == pytest.approx(0, abs=1e-6)

    noisy = copy.deepcopy(tiny_llama)
    noisy.lm_head.weight.add_(0.05 * torch.randn_like(noisy.lm_head.weight, generator=None))
    result = evaluate_perplexity(noisy, CharacterTokenizer(), task, items, reference_model=tiny_llama)
    ids = torch.tensor(CharacterTokenizer()(items[0]["text"]).input_ids[:5 * 32]).view(5, 32)
    per_token = full_kld(*(torch.log_softmax(m(ids).logits[:, :-1], -1) for m in (tiny_llama, noisy))).flatten()
    assert result.metrics["mean_kld"] == pytest.approx(float(per_token.mean()), rel=1e-4)
    assert result.metrics["median_kld"] == pytest.approx(float(per_token.median()), rel=1e-3)
    assert result.metrics["mean_kld_se"] == pytest.approx(float(per_token.std() / len(per_token) ** 0.5), rel=1e-3)
    base = evaluate_perplexity(tiny_llama, CharacterTokenizer(), task, items)
    expected = math.log(result.metrics["perplexity"] / base.metrics["perplexity"])
    assert result.metrics["ln_ppl_ratio"] == pytest.approx(expected, rel=1e-5)


# ---- closing mutation-testing survivors (make mutate): each test fails on a mutant that gave a wrong number ----

def test_ndcg_when_the_query_has_nothing_relevant_and_when_the_ideal_is_one():
    assert stats.ndcg_at_k([0, 0], [0, 0], 10) == 0.0  # trec_eval: no relevant passage judged, nDCG 0
    assert stats.ndcg_at_k([0, 1], [1], 10) == pytest.approx(1 / math.log2(3))  # ideal DCG exactly 1


@pytest.mark.parametrize("metric,base,quant,expected", [
    ("accuracy", {"correct": True}, {"correct": False}, 0.0),
    ("perplexity", {"nll": 20.0, "tokens": 10}, {"nll": 25.0, "tokens": 10}, math.exp(2.0) / math.exp(2.5)),
    ("ndcg@10", {"score": 0.8, "mrr": 1.0}, {"score": 0.6, "mrr": 0.25}, 0.75),
    ("mrr@10", {"score": 0.8, "mrr": 1.0}, {"score": 0.6, "mrr": 0.25}, 0.25),
    ("strict-match", {"correct": False, "correct_strict-match": True, "output": "", "prediction": "1"},
     {"correct": True, "correct_strict-match": True, "output": "", "prediction": None}, 1.0),
    ("answered", {"correct": False, "correct_strict-match": True, "output": "", "prediction": "1"},
     {"correct": True, "correct_strict-match": True, "output": "", "prediction": None}, 0.0),
])
def test_each_metric_is_aggregated_from_its_own_per_item_column(metric, base, quant, expected):
    """With one item every bootstrap resample is that item, so the interval collapses onto the retention computed
    by hand from the metric's own column (perplexity from NLL and tokens, MRR from mrr, nDCG from score, ...)."""
    low, high = stats.retention_interval([{"id": "a", **base}], [{"id": "a", **quant}], metric, resamples=20)
    assert low == pytest.approx(expected) and high == pytest.approx(expected)


def test_the_bootstrap_resamples_every_item_with_replacement():
    """One item in 100 differs: resampling must sometimes leave it out (retention 1) and sometimes draw it twice."""
    base = _items([True] * 100)
    quant = _items([False] + [True] * 99)
    low, high = stats.retention_interval(base, quant, "accuracy")
    assert low <= 0.98 and high == 1.0


def test_gate_boundaries_and_reasons():
    no_interval = stats.judge("accuracy", 0.5, 0.45, None, 40, 0.9, informative=True)
    assert no_interval.status == "pass" and "0.900" in no_interval.reason  # retention exactly at the threshold
    assert stats.judge("accuracy", 0.5, 0.44, None, 40, 0.9, informative=True).status == "fail"
    # Perplexity retention is inverted: 10 -> 11 retains 0.909, which fails 0.95.
    assert stats.judge("perplexity", 10.0, 11.0, None, 40, 0.95, informative=True).status == "fail"
    assert stats.judge("accuracy", 0.5, 0.46, (0.80, 0.90), 100, 0.9, informative=True).status == "inconclusive"
    at_low = stats.judge("accuracy", 0.5, 0.46, (0.90, 0.95), 100, 0.9, informative=True)
    assert at_low.status == "pass" and "[0.900, 0.950]" in at_low.reason
    below = stats.judge("accuracy", 0.5, 0.40, (0.70, 0.85), 100, 0.9, informative=True)
    assert "[0.700, 0.850]" in below.reason and "below" in below.reason
    # the items that would settle it: n x (half-width / distance to the threshold)^2 = 100 x (0.05 / 0.02)^2
    settle = stats.judge("accuracy", 0.5, 0.44, (0.83, 0.93), 100, 0.9, informative=True)
    assert "n=625" in settle.reason, settle.reason
    straddle = stats.judge("accuracy", 0.5, 0.44, (0.83, 0.93), 100, 0.9, informative=True, strict=True)
    assert straddle.status == "fail" and "strict" in straddle.reason
    at_minimum = stats.judge("accuracy", 0.5, 0.5, None, 50, 0.9, informative=False, fallback=("correlation", 0.3, 0.3))
    assert at_minimum.status == "uninformative" and "correlation: 0.300 >= 0.3" in at_minimum.reason
    below_minimum = stats.judge("accuracy", 0.5, 0.5, None, 50, 0.9, informative=False, fallback=("correlation", 0.2, 0.3))
    assert "correlation: 0.200 < 0.3" in below_minimum.reason
    assert "not informative" in stats.judge("accuracy", 0.5, 0.5, None, 50, 0.9, informative=False).reason


def test_divergence_bounds_are_inclusive():
    passed = stats.Verdict("pass", "retention")
    assert stats.judge_divergence(passed, {"mean_kld": 0.5, "same_top_p": 0.8}, 0.5, 0.8) is passed
    failed = stats.judge_divergence(passed, {"mean_kld": 0.6, "same_top_p": 0.8}, 0.5, None)
    assert failed.status == "fail" and "0.6000 > 0.5" in failed.reason
    assert "0.700 < 0.8" in stats.judge_divergence(passed, {"mean_kld": 0.1, "same_top_p": 0.7}, None, 0.8).reason


def test_agreement_answered_rate_and_score_correlation():
    base = [{"id": "a", "prediction": 1, "score": 1.0}, {"id": "b", "prediction": 0, "score": 2.0},
            {"id": "c", "prediction": 1, "score": 4.0}]
    quant = [{"id": "a", "prediction": 1, "score": 2.0}, {"id": "b", "prediction": 1, "score": 4.0},
             {"id": "c", "prediction": 1, "score": 8.0}]
    assert stats.agreement(base, quant) == pytest.approx(2 / 3)
    assert stats.score_correlation(base, quant) == pytest.approx(1.0)
    assert stats.score_correlation(base, [{**q, "score": -q["score"]} for q in quant]) == pytest.approx(-1.0)
    assert stats.score_correlation(base, [{**q, "score": 1.0} for q in quant]) == 0.0  # a constant score
    assert stats.score_correlation([{"id": "a", "score": None}], [{"id": "a", "score": None}]) is None
    rankings = [{"id": "q", "ranking": ["d1", "d2"]}], [{"id": "q", "ranking": ["d2", "d1"]}]
    assert stats.agreement(*rankings) == 0.0 and stats.agreement(rankings[0], rankings[0]) == 1.0
    assert stats.agreement([{"id": "w", "nll": 1.0}], [{"id": "w", "nll": 2.0}]) is None
    generations = [{"id": str(i), "output": "", "prediction": p} for i, p in enumerate(["3", None, None, "4"])]
    assert stats.answered_rate(generations) == 0.5


def test_flips_roc_auc_and_chance_read_every_item():
    assert stats.flips([{"id": "a", "nll": 1.0}], [{"id": "a", "nll": 1.0}]) is None
    assert stats.roc_auc([0.2, 0.9, 0.4], [True, False, False]) == 0.0  # the positive ranks below both negatives
    assert stats.roc_auc([0.9, 0.1, 0.5], [True, False, False]) == 1.0
    assert stats.roc_auc([0.9, 0.8], [True, True]) is None
    assert stats.chance_rate([{"id": "x"}, {"id": "y", "label": True}]) is None
    assert stats.mcnemar_exact(1, 0) == 1.0
    with pytest.raises(ValueError, match="same items in the same order"):
        stats.flips(_items([True, False]), list(reversed(_items([True, False]))))
    assert math.isnan(stats.mean([]))


def _paired_draw(rng: np.random.Generator, n: int, accuracy: float, agreement: float) -> tuple[list, list]:
    """Per-item correctness of a baseline at ``accuracy`` and a candidate that gives the baseline's outcome on each
    item with probability ``agreement`` and the other one otherwise: the paired structure of a quantized model."""
    base = rng.random(n) < accuracy
    quant = np.where(rng.random(n) < agreement, base, ~base)
    return ([{"id": str(i), "correct": bool(x)} for i, x in enumerate(base)],
            [{"id": str(i), "correct": bool(x)} for i, x in enumerate(quant)])


def _unpaired_interval(baseline: list, quantized: list, seed: int) -> tuple[float, float]:
    """The interval a bootstrap that resamples each model's items on its own would give (what the gate must not
    do: it ignores that both models answered the same questions)."""
    rng = np.random.default_rng(seed)
    base = np.array([item["correct"] for item in baseline], dtype=float)
    quant = np.array([item["correct"] for item in quantized], dtype=float)
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
        low, high = stats.retention_interval(*_paired_draw(rng, N_ITEMS, ACCURACY, AGREEMENT), "accuracy", seed=draw)
        covered += low <= TRUE_RETENTION <= high
    assert 0.93 <= covered / 1000 <= 0.97, covered / 1000


def test_the_paired_interval_is_narrower_than_an_unpaired_one_when_the_models_agree():
    """What the two models share cancels in the paired resample: measured 0.118 against 0.26 mean width."""
    rng = np.random.default_rng(7)
    paired, unpaired = [], []
    for draw in range(100):
        baseline, quantized = _paired_draw(rng, N_ITEMS, ACCURACY, AGREEMENT)
        low, high = stats.retention_interval(baseline, quantized, "accuracy", seed=draw)
        paired.append(high - low)
        low, high = _unpaired_interval(baseline, quantized, draw)
        unpaired.append(high - low)
    assert np.mean(paired) < 0.6 * np.mean(unpaired), (np.mean(paired), np.mean(unpaired))
