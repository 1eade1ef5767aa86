"""Statistics of two models' per-item results on the same items, for the gate (none of them changes a cached
number): paired bootstrap intervals for retention, McNemar's exact test, flips, agreement, score correlation,
ROC-AUC, chance rates."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from quant.metrics import lower_is_better, mean

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


# ---- aggregates over per-item records, so the bootstrap can resample items ---------------------------

def _aggregate(metric: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """How a task's headline metric is computed from per-item columns: over the last axis, so that one call
    aggregates every bootstrap resample at once ([resamples, items] columns)."""
    if metric == "perplexity":
        return lambda c: np.exp(c["nll"].sum(-1) / c["tokens"].sum(-1))
    if metric == "mrr@10":
        return lambda c: c["mrr"].mean(-1)
    if metric == "ndcg@10":
        return lambda c: c["score"].mean(-1)
    if metric in ("accuracy", "answered"):
        column = "correct" if metric == "accuracy" else metric
        return lambda c: c[column].mean(-1)
    return lambda c: c[f"correct_{metric}"].mean(-1)  # generation extractions (strict-match, ...)


def _columns(items: list[dict]) -> dict[str, np.ndarray]:
    keys = [k for k, v in items[0].items() if isinstance(v, (bool, int, float)) and not isinstance(v, str)]
    columns = {k: np.array([item[k] for item in items], dtype=float) for k in keys}
    if "output" in items[0]:  # generations: whether an answer could be extracted at all
        columns["answered"] = np.array([item["prediction"] is not None for item in items], dtype=float)
    return columns


def _paired(baseline: list[dict], quantized: list[dict]) -> tuple[dict, dict]:
    ids = [item["id"] for item in baseline]
    if ids != [item["id"] for item in quantized]:
        raise ValueError("paired statistics need the same items in the same order for both models")
    return _columns(baseline), _columns(quantized)


def retention(base_value: float, quant_value: float, metric: str) -> float | None:
    """quantized / baseline for higher-is-better metrics, baseline / quantized for perplexity; None when
    the baseline scores zero (a 0/n baseline retains nothing measurable)."""
    numerator, denominator = (base_value, quant_value) if lower_is_better(metric) else (quant_value, base_value)
    return numerator / denominator if denominator > 0 else None


def retention_interval(baseline: list[dict], quantized: list[dict], metric: str,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of the retention: each resample draws items with replacement and takes the
    same items for both models, so what the two share (most items, for a good quantization) cancels out."""
    base, quant = _paired(baseline, quantized)
    aggregate = _aggregate(metric)
    rows = np.random.default_rng(seed).integers(0, len(baseline), (resamples, len(baseline)))
    base_values = aggregate({k: v[rows] for k, v in base.items()})
    quant_values = aggregate({k: v[rows] for k, v in quant.items()})
    numerator, denominator = (base_values, quant_values) if lower_is_better(metric) else (quant_values, base_values)
    defined = denominator > 0  # as retention(): a resample whose baseline scores 0 retains nothing measurable
    if defined.sum() < resamples / 2:
        return None
    low, high = np.percentile(numerator[defined] / denominator[defined], [2.5, 97.5])
    return float(low), float(high)


def flips(baseline: list[dict], quantized: list[dict]) -> dict[str, int] | None:
    """Items correct -> wrong and wrong -> correct; None for tasks without per-item correctness."""
    if baseline[0].get("correct") is None:
        return None
    base, quant = _paired(baseline, quantized)
    b, q = base["correct"].astype(bool), quant["correct"].astype(bool)
    return {"correct_to_wrong": int((b & ~q).sum()), "wrong_to_correct": int((~b & q).sum())}


def mcnemar_exact(correct_to_wrong: int, wrong_to_correct: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    n = correct_to_wrong + wrong_to_correct
    if n == 0:
        return 1.0
    k = min(correct_to_wrong, wrong_to_correct)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def agreement(baseline: list[dict], quantized: list[dict]) -> float | None:
    """Fraction of items where both models give the same answer (the same top passage, for rankings)."""
    if "prediction" in baseline[0]:
        return mean([b["prediction"] == q["prediction"] for b, q in zip(baseline, quantized)])
    if "ranking" in baseline[0]:
        return mean([b["ranking"][0] == q["ranking"][0] for b, q in zip(baseline, quantized)])
    return None


def score_correlation(baseline: list[dict], quantized: list[dict]) -> float | None:
    """Pearson correlation of the per-item threshold-free score (e.g. log p(yes) - log p(no)) between the
    models: still meaningful when the baseline's decisions are coin flips, and near 0 for a broken model."""
    if not isinstance(baseline[0].get("score"), float):
        return None
    base, quant = _paired(baseline, quantized)
    if base["score"].std() == 0 or quant["score"].std() == 0:
        return 0.0
    return float(np.corrcoef(base["score"], quant["score"])[0, 1])


def answered_rate(items: list[dict]) -> float:
    """Share of generations from which an answer could be extracted (the model kept the answer format)."""
    return float(_columns(items)["answered"].mean())


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Threshold-free separability of a score (e.g. log p(yes) - log p(no)); ties count half."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def chance_rate(items: list[dict]) -> float | None:
    """Majority-class rate of a classification subset (what always answering the commoner label scores)."""
    if "label" not in items[0]:
        return None
    share = mean([bool(item["label"]) for item in items])
    return max(share, 1 - share)
