"""Metric definitions as the field's tools compute them (quant/metrics.py): trec_eval's nDCG@k, MRR@k, means."""
import math

import pytest

from quant import metrics


def test_ranking_metrics():
    assert metrics.ndcg_at_k([3, 2, 0], [3, 2, 0], 10) == pytest.approx(1.0)
    assert metrics.ndcg_at_k([0, 0, 3], [3, 0, 0], 10) == pytest.approx(1 / 2)  # log2(4) = 2
    # trec_eval: the grade is the gain (not 2^g - 1), and the ideal counts judged passages never ranked
    assert metrics.ndcg_at_k([1, 3], [3, 1], 10) == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert metrics.ndcg_at_k([2], [2, 2], 10) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert metrics.mrr_at_k([False, True], 10) == 0.5
    assert metrics.mrr_at_k([False] * 12, 10) == 0.0


def test_ndcg_when_the_query_has_nothing_relevant_and_when_the_ideal_is_one():
    assert metrics.ndcg_at_k([0, 0], [0, 0], 10) == 0.0  # trec_eval: no relevant passage judged, nDCG 0
    assert metrics.ndcg_at_k([0, 1], [1], 10) == pytest.approx(1 / math.log2(3))  # ideal DCG exactly 1


def test_the_mean_of_nothing_is_not_a_number():
    assert math.isnan(metrics.mean([]))
