import math

import pytest

import torch

from quant import stats
from quant.tasks import _top_k_kld


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


def test_top_k_kld_is_zero_for_equal_distributions_and_bounded_by_the_full_kld():
    generator = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    q = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    top = p.topk(10, dim=-1).indices
    assert torch.allclose(_top_k_kld(p.gather(-1, top), p.gather(-1, top)), torch.zeros(5), atol=1e-6)
    full = (p.exp() * (p - q)).sum(-1)
    approx = _top_k_kld(p.gather(-1, top), q.gather(-1, top))
    assert (approx >= -1e-6).all() and (approx <= full + 1e-5).all()


def test_divergence_bounds_turn_a_pass_into_a_fail():
    passed = stats.Verdict("pass", "ok")
    metrics = {"mean_kld": 0.5, "same_top_p": 0.6}
    assert stats.judge_divergence(passed, metrics, 0.1, None).failed
    assert stats.judge_divergence(passed, metrics, None, 0.8).failed
    assert not stats.judge_divergence(passed, metrics, 1.0, 0.5).failed
