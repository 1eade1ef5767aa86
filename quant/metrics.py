"""Metric definitions that tasks compute per item and per run (they change cached results): means, trec_eval's
nDCG@k and MRR@k."""
from __future__ import annotations

import math
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def ndcg_at_k(grades: Sequence[int], judged: Sequence[int], k: int) -> float:
    """nDCG@k as trec_eval's ``ndcg_cut`` computes it: the gain is the grade itself, discounted by log2(rank + 1),
    and the ideal ranking orders every judged passage of the query (the qrels), not only the ranked candidates.
    ``grades``: the ranked list's grades (0 for unjudged)."""
    def dcg(values: Sequence[int]) -> float:
        return sum(g / math.log2(rank + 2) for rank, g in enumerate(values[:k]))

    ideal = dcg(sorted(judged, reverse=True))
    return dcg(grades) / ideal if ideal > 0 else 0.0


def mrr_at_k(relevant: Sequence[bool], k: int) -> float:
    return next((1.0 / (rank + 1) for rank, hit in enumerate(relevant[:k]) if hit), 0.0)

