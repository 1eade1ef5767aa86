"""When a baseline's result says anything a retention can hold, and what to gate on when it does not: one rule per
task kind, beside the gate that applies it. This is policy, so it is in no cache key: changing a rule re-judges
cached results and recomputes none (the kinds' modules, which compute the numbers, are in the results' keys)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from quant import stats
from quant.kinds import TaskSpec, kind_of
from quant.kinds.base import Columns
from quant.kinds.rerank import FIELDS

Fallback = tuple[str, float, float]  # (signal name, value, minimum) gated on when the baseline is not informative


@dataclasses.dataclass
class Informativeness:
    """Whether a baseline's result can be gated on retention, the signal to gate on when it cannot, and the
    statistics behind the decision (shown in the report)."""

    informative: bool
    fallback: Fallback | None
    signals: dict[str, Any]


Rule = Callable[[TaskSpec, dict[str, Any], str, dict[str, float], Columns, Columns], Informativeness]


def above_chance(task: TaskSpec, gate: dict[str, Any], metric: str, baseline_metrics: dict[str, float],
                 baseline: Columns, candidate: Columns) -> Informativeness:
    """Multiple choice: informative when the baseline beats always answering the commoner label by
    ``chance_margin``. Near chance, the decisions are coin flips that any perturbation changes; the score behind
    them still correlates with the baseline's unless the model is broken: that is the fallback."""
    labels = baseline["label"].astype(int).tolist()
    chance = stats.majority_rate(labels)
    base_scores, candidate_scores = baseline["logodds"].tolist(), candidate["logodds"].tolist()
    correlation = stats.correlation(base_scores, candidate_scores)
    signals: dict[str, Any] = {"chance": chance, "score_correlation": correlation}
    if len(task["choices"]) == 2:
        signals["roc_auc_baseline"] = stats.roc_auc(base_scores, labels)
        signals["roc_auc_quantized"] = stats.roc_auc(candidate_scores, labels)
    return Informativeness(baseline_metrics[metric] >= chance + gate["chance_margin"],
                           ("score correlation with the baseline", correlation, gate["correlation_min"]), signals)


def above_bm25(task: TaskSpec, gate: dict[str, Any], metric: str, baseline_metrics: dict[str, float],
               baseline: Columns, candidate: Columns) -> Informativeness:
    """Re-ranking: a re-ranker that does not beat BM25's own order of the same candidates measures nothing yet; its
    per-query scores still follow the baseline's unless the quantized model is broken: the fallback."""
    field = FIELDS[metric]
    bm25 = baseline_metrics[f"bm25_{metric}"]
    correlation = stats.correlation(baseline[field], candidate[field])
    return Informativeness(baseline_metrics[metric] > bm25,
                           (f"per-query {metric} correlation with the baseline", correlation, gate["correlation_min"]),
                           {"bm25": bm25, "score_correlation": correlation})


def solves_enough(task: TaskSpec, gate: dict[str, Any], metric: str, baseline_metrics: dict[str, float],
                  baseline: Columns, candidate: Columns) -> Informativeness:
    """Generation: informative when the baseline solves at least ``min_correct`` items. A model that solves almost
    nothing can still be damaged: it stops producing answers at all. The fallback is that answer-format retention,
    judged like retention on its interval: fail only when even the upper bound is below the bar."""
    answered = stats.retention_interval(baseline, candidate, kind_of(task).aggregate("answered"),
                                        lower_is_better=False)
    signals = {"answered_baseline": float(baseline["answered"].mean()),
               "answered_quantized": float(candidate["answered"].mean()), "answered_retention_ci": answered}
    # (a baseline that never answers leaves nothing to retain)
    fallback = ("answer-format retention, 95% CI upper bound", answered[1], gate["retention_min"]) if answered else None
    return Informativeness(baseline["correct"].sum() >= gate["min_correct"], fallback, signals)


RULES: dict[str, Rule] = {"choice": above_chance, "rerank": above_bm25, "generate": solves_enough}


def informativeness(task: TaskSpec, gate: dict[str, Any], metric: str, baseline_metrics: dict[str, float],
                    baseline: Columns, candidate: Columns) -> Informativeness:
    """The task kind's rule (a kind without one, such as perplexity or lm-eval's tasks, is always informative),
    from both results' per-item columns (the gate's own, computed once) and the baseline's metrics."""
    rule = RULES.get(task.kind)
    return rule(task, gate, metric, baseline_metrics, baseline, candidate) if rule else Informativeness(True, None, {})
