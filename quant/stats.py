"""Statistics of two models' per-item results on the same items, for the gate (none of them changes a cached
number): paired bootstrap intervals for retention, McNemar's exact test, flips, agreement, correlation, ROC-AUC,
majority rates. Numbers in, numbers out: the task kinds say which columns they read."""
from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import torch

from quant.metrics import mean

if TYPE_CHECKING:  # the kinds use these statistics for their informative rules
    from quant.kinds.base import Aggregate, Columns

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def same_items(baseline: list[dict], quantized: list[dict]) -> None:
    """Paired statistics need both models' records on the same items in the same order."""
    if [item["id"] for item in baseline] != [item["id"] for item in quantized]:
        raise ValueError("paired statistics need the same items in the same order for both models")


def retention(base_value: float, quant_value: float, *, lower_is_better: bool) -> float | None:
    """quantized / baseline for higher-is-better metrics, baseline / quantized for perplexity; None when
    the baseline scores zero (a 0/n baseline retains nothing measurable)."""
    numerator, denominator = (base_value, quant_value) if lower_is_better else (quant_value, base_value)
    return numerator / denominator if denominator > 0 else None


def retention_interval(base: Columns, quant: Columns, aggregate: Aggregate, *, lower_is_better: bool,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of the retention of the metric ``aggregate`` computes from per-item columns:
    each resample draws items with replacement and takes the same items for both models, so what the two share
    (most items, for a good quantization) cancels out."""
    ratios = bootstrap_retentions(base, quant, aggregate, lower_is_better=lower_is_better, resamples=resamples,
                                  seed=seed)
    return interval_of(ratios) if ratios is not None else None


def interval_of(ratios: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap retentions."""
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def p_at_least(ratios: np.ndarray, threshold: float) -> float:
    """One-sided bootstrap p-value of "the retention is at least ``threshold``": the share of resamples at or above
    it (with the usual +1 so that it is never 0). Below 0.025 about when the 95% interval lies below it."""
    return float((np.sum(ratios >= threshold) + 1) / (len(ratios) + 1))


def bootstrap_retentions(base: Columns, quant: Columns, aggregate: Aggregate, *, lower_is_better: bool,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray | None:
    """The retention of each paired resample whose baseline is defined; None when fewer than half are."""
    n = len(next(iter(base.values())))
    rows = np.random.default_rng(seed).integers(0, n, (resamples, n))
    base_values = aggregate({k: v[rows] for k, v in base.items()})
    quant_values = aggregate({k: v[rows] for k, v in quant.items()})
    numerator, denominator = (base_values, quant_values) if lower_is_better else (quant_values, base_values)
    defined = denominator > 0  # as retention(): a resample whose baseline scores 0 retains nothing measurable
    if defined.sum() < resamples / 2:
        return None
    return numerator[defined] / denominator[defined]


def flips(base_correct: np.ndarray, quant_correct: np.ndarray) -> dict[str, int]:
    """Items correct -> wrong and wrong -> correct."""
    b, q = base_correct.astype(bool), quant_correct.astype(bool)
    return {"correct_to_wrong": int((b & ~q).sum()), "wrong_to_correct": int((~b & q).sum())}


def mcnemar_exact(correct_to_wrong: int, wrong_to_correct: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    n = correct_to_wrong + wrong_to_correct
    if n == 0:
        return 1.0
    k = min(correct_to_wrong, wrong_to_correct)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def agreement(base_answers: Sequence, quant_answers: Sequence) -> float:
    """Fraction of items where both models give the same answer."""
    return mean([b == q for b, q in zip(base_answers, quant_answers, strict=True)])


def correlation(base_scores: Sequence[float], quant_scores: Sequence[float]) -> float:
    """Pearson correlation of a per-item threshold-free score (e.g. log p(yes) - log p(no)) between the models:
    still meaningful when the baseline's decisions are coin flips, and near 0 for a broken model (0 when either
    is constant)."""
    base, quant = np.asarray(base_scores, dtype=float), np.asarray(quant_scores, dtype=float)
    if base.std() == 0 or quant.std() == 0:
        return 0.0
    return float(np.corrcoef(base, quant)[0, 1])


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Threshold-free separability of a score (e.g. log p(yes) - log p(no)); ties count half."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def holm(p_values: dict[str, float], alpha: float) -> list[str]:
    """Holm's step-down procedure: the names whose hypotheses are rejected at family-wise error ``alpha``. The k-th
    smallest p-value (from 0) is held to alpha / (m - k); the first that is not stops the procedure."""
    rejected = []
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    for k, (name, p) in enumerate(ordered):
        if p > alpha / (len(ordered) - k):
            break
        rejected.append(name)
    return rejected


def majority_rate(labels: Sequence) -> float:
    """What always answering the commoner of two labels scores (the chance rate of a yes/no subset)."""
    share = mean([bool(label) for label in labels])
    return max(share, 1 - share)


def spent_alpha(fraction: float, alpha: float) -> float:
    """Lan-DeMets' O'Brien-Fleming-type spending function: the share of a one-sided ``alpha`` spent by information
    ``fraction`` (items so far / the profile's n), 2 - 2 Phi(z_(1-alpha/2) / sqrt(t)). It spends almost nothing at
    early looks, so the last look's boundary stays close to the fixed test's and little power is lost."""
    normal = NormalDist()
    return 2 * (1 - normal.cdf(normal.inv_cdf(1 - alpha / 2) / math.sqrt(fraction)))


def _normal_cdf(x: np.ndarray | float) -> np.ndarray:
    return torch.special.ndtr(torch.as_tensor(x, dtype=torch.float64)).numpy()


class GroupSequential:
    """A one-sided group sequential test at looks taken at information ``fractions`` (increasing, the last 1):
    the boundaries ``c_k`` a standardised statistic Z_k crosses (Z_k <= -c_k) with total probability ``alpha`` under
    the null, each look spending ``spent_alpha`` of it, and the stage-wise p-value of where a sequence stopped.

    Under the canonical joint distribution (Jennison & Turnbull, ch. 3 and 19), S_k = Z_k sqrt(t_k) is a Brownian
    motion observed at t_k: the null density of S_k among the sequences still running is the previous look's, cut
    at its boundary and convolved with N(0, t_k - t_(k-1)), computed here on a grid. Only the crossing being tested
    stops a sequence in this computation; a symmetric boundary for the other direction stops some sequences earlier,
    which can only lower the error rate."""

    GRID = 1601  # points of S over +-8 standard deviations of the last look

    def __init__(self, fractions: Sequence[float], alpha: float) -> None:
        if not fractions or fractions[0] <= 0 or any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"look fractions must increase from above 0: {list(fractions)}")
        self.fractions, self.alpha = [float(t) for t in fractions], alpha
        self.grid = np.linspace(-8.0, 8.0, self.GRID) * math.sqrt(self.fractions[-1])
        self.boundaries: list[float] = []
        self._running: list[np.ndarray] = []  # null density of S_k on the grid, sequences not stopped by look k
        for k, fraction in enumerate(self.fractions):
            spent_before = spent_alpha(self.fractions[k - 1], alpha) if k else 0.0
            self.boundaries.append(self._boundary(k, spent_alpha(min(fraction, 1.0), alpha) - spent_before))
            self._running.append(self._density(k) * (self.grid > -self.boundaries[k] * math.sqrt(fraction)))

    def _density(self, k: int) -> np.ndarray:
        fraction = self.fractions[k]
        if k == 0:
            return np.exp(-self.grid**2 / (2 * fraction)) / math.sqrt(2 * math.pi * fraction)
        step = fraction - self.fractions[k - 1]
        kernel = np.exp(-(self.grid[:, None] - self.grid[None, :]) ** 2 / (2 * step)) / math.sqrt(2 * math.pi * step)
        return kernel @ self._running[k - 1] * (self.grid[1] - self.grid[0])

    def _mass_below(self, k: int, z: np.ndarray) -> np.ndarray:
        """P(not stopped before look k, Z_k <= z) under the null, for each z: the last step's normal integrated
        exactly against the grid."""
        z = np.asarray(z, dtype=float)
        if k == 0:
            return _normal_cdf(z)
        s = z[..., None] * math.sqrt(self.fractions[k])
        step = self.fractions[k] - self.fractions[k - 1]
        spacing = self.grid[1] - self.grid[0]
        return (self._running[k - 1] * _normal_cdf((s - self.grid) / math.sqrt(step))).sum(-1) * spacing

    def _boundary(self, k: int, target: float) -> float:
        """The c with P(not stopped before look k, Z_k <= -c) = target, by bisection (at most 12)."""
        low, high = 0.0, 12.0
        for _ in range(50):
            middle = (low + high) / 2
            low, high = (middle, high) if float(self._mass_below(k, -middle)) > target else (low, middle)
        return (low + high) / 2

    def p_value(self, look: int, z: float) -> float:
        """The stage-wise p-value of a sequence that stopped, or ended, at ``look`` (from 0) with statistic ``z``: the
        null probability of crossing at an earlier look, or at this one with a statistic as low. Uniform under the
        null whatever the look, so a stopped case enters Holm's correction like a fixed one."""
        return float(self.p_values(look, np.array(z)))

    def p_values(self, look: int, z: np.ndarray) -> np.ndarray:
        """``p_value`` for each of the statistics ``z`` at one look."""
        earlier = spent_alpha(self.fractions[look - 1], self.alpha) if look else 0.0  # what the looks before spent
        return np.minimum(1.0, earlier + self._mass_below(look, z))

    def expected_fraction(self, drift: float, runs: int = 20000, seed: int = 0) -> float:
        """The mean information fraction at which sequences stop (either boundary, else the last look) when Z at the
        last look has mean ``drift`` (the true distance to the threshold in final standard errors): simulated
        paths of the same Brownian motion, for the plan's expected items."""
        fractions = np.array(self.fractions)
        steps = np.random.default_rng(seed).standard_normal((runs, len(fractions))) * np.sqrt(np.diff([0, *fractions]))
        z = (np.cumsum(steps, axis=1) + drift * fractions) / np.sqrt(fractions)
        crossed = np.abs(z) >= np.array(self.boundaries)
        stop = np.where(crossed.any(axis=1), crossed.argmax(axis=1), len(fractions) - 1)
        return float(fractions[stop].mean())
