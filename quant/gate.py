"""The gate: the one place the policy lives. From two results on the same items (a baseline's and a candidate's)
to a verdict: the paired statistics, the informative rule per task kind and its fallback signal, the retention
rule, and the divergence bounds. Pure (no model, no cache, no file) and outside the cache key: changing how a
verdict is reached or worded reuses every cached model and result."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from quant import stats
from quant.matrix import Case
from quant.metrics import lower_is_better
from quant.tasks import TaskResult

# llama.cpp --kl-divergence's statistics, reported beside each perplexity row
DIVERGENCE_METRICS = ("mean_kld", "mean_kld_se", "median_kld", "p99_kld", "same_top_p", "ln_ppl_ratio")


@dataclasses.dataclass
class Verdict:
    """pass / fail / inconclusive / uninformative, the rule that decided, and the numbers behind it."""

    status: str
    reason: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def retention_verdict(
    metric: str, baseline_value: float, quant_value: float, interval: tuple[float, float] | None, n: int,
    threshold: float, informative: bool, fallback: tuple[str, float, float] | None = None, strict: bool = False,
) -> Verdict:
    """The gate's rule. An uninformative baseline (near chance, or solving almost nothing) is gated on
    ``fallback`` = (signal name, value, minimum), an agreement-type signal; otherwise the retention interval
    is held against ``threshold``: fail when the upper bound is below it, pass when the lower bound is above
    it, and in between fail only when ``strict``, else report how many items would settle it."""
    value = stats.retention(baseline_value, quant_value, metric)
    if not informative or value is None:
        why = (f"baseline {baseline_value:.4g} is not informative" if value is not None
               else "baseline scores 0, so retention is undefined")
        if fallback is None:
            return Verdict("uninformative", why)
        name, signal, minimum = fallback
        if signal < minimum:
            return Verdict("fail", f"{why}; gated on {name}: {signal:.3f} < {minimum}")
        return Verdict("uninformative", f"{why}; gated on {name}: {signal:.3f} >= {minimum}")
    if interval is None:
        status = "pass" if value >= threshold else "fail"
        return Verdict(status, f"retention {value:.3f} vs {threshold:.3f} (no interval)")
    low, high = interval
    if high < threshold:
        return Verdict("fail", f"retention 95% CI [{low:.3f}, {high:.3f}] lies below {threshold:.3f}")
    if low >= threshold:
        return Verdict("pass", f"retention 95% CI [{low:.3f}, {high:.3f}] lies above {threshold:.3f}")
    if strict:
        return Verdict("fail", f"strict: retention 95% CI [{low:.3f}, {high:.3f}] straddles {threshold:.3f}")
    gap = abs(value - threshold)
    needed = math.ceil(n * ((high - low) / 2 / gap) ** 2) if gap > 0 else None
    settle = f"about n={needed} would settle it" if needed else "the point estimate sits on the threshold"
    return Verdict("inconclusive",
                   f"inconclusive at n={n}: CI [{low:.3f}, {high:.3f}] straddles {threshold:.3f}; {settle}")


def judge_divergence(verdict: Verdict, metrics: dict[str, float], kld_max: float | None,
                     same_top_min: float | None) -> Verdict:
    """Distribution-level bounds on top of the perplexity verdict: mean KLD and same-top-token rate are
    low-noise (every token counts), so they are held as plain bounds."""
    if kld_max is not None and metrics["mean_kld"] > kld_max:
        return Verdict("fail", f"mean KLD {metrics['mean_kld']:.4f} > {kld_max}; {verdict.reason}")
    if same_top_min is not None and metrics["same_top_p"] < same_top_min:
        return Verdict("fail", f"same top token {metrics['same_top_p']:.3f} < {same_top_min}; {verdict.reason}")
    return verdict


@dataclasses.dataclass
class Comparison:
    """A case's outcome: both results on the same items and the statistics that gate it."""

    case: Case
    metric: str
    baseline: TaskResult
    quantized: TaskResult
    retention: float | None
    interval: tuple[float, float] | None
    verdict: Verdict
    extra: dict[str, Any]


def judge(case: Case, baseline: TaskResult, quantized: TaskResult, metric: str | None = None) -> Comparison:
    """The statistics and the gate's verdict for two results on the same items."""
    metric = metric or headline_metric(case)
    base_value, quant_value = baseline.metrics[metric], quantized.metrics[metric]
    value = stats.retention(base_value, quant_value, metric)
    interval = stats.retention_interval(baseline.items, quantized.items, metric)
    gate = case.gate
    chance = stats.chance_rate(baseline.items)
    extra: dict[str, Any] = {"chance": chance, "agreement": stats.agreement(baseline.items, quantized.items)}
    flips = stats.flips(baseline.items, quantized.items)
    if flips:
        extra["flips"] = flips
        extra["mcnemar_p"] = stats.mcnemar_exact(flips["correct_to_wrong"], flips["wrong_to_correct"])
    if case.task.kind == "choice" and len(case.task["choices"]) == 2:
        labels = [item["label"] for item in baseline.items]
        extra["roc_auc_baseline"] = stats.roc_auc([i["score"] for i in baseline.items], labels)
        extra["roc_auc_quantized"] = stats.roc_auc([i["score"] for i in quantized.items], labels)
    informative = True
    fallback = None
    if chance is not None:
        informative = base_value >= chance + gate["chance_margin"]
        # Near chance, the yes/no decisions are coin flips that any perturbation changes; the score
        # behind them still correlates with the baseline's unless the model is broken.
        extra["score_correlation"] = stats.score_correlation(baseline.items, quantized.items)
        fallback = ("score correlation with the baseline", extra["score_correlation"], gate["correlation_min"])
    elif case.task.kind == "rerank":
        # a re-ranker that does not beat BM25's own order of the same candidates measures nothing yet
        extra["bm25"] = baseline.metrics[f"bm25_{metric}"]
        informative = base_value > extra["bm25"]
        # its per-query scores still follow the baseline's unless the quantized model is broken
        extra["score_correlation"] = stats.score_correlation(baseline.items, quantized.items)
        fallback = (f"per-query {metric} correlation with the baseline", extra["score_correlation"],
                    gate["correlation_min"])
    elif case.task.kind == "generate":
        informative = sum(bool(i["correct"]) for i in baseline.items) >= gate["min_correct"]
        # A model that solves almost nothing can still be damaged: it stops producing answers at all.
        extra["answered_baseline"] = stats.answered_rate(baseline.items)
        extra["answered_quantized"] = stats.answered_rate(quantized.items)
        # Judged like retention, on its interval: fail only when even the upper bound is below the bar.
        answered = stats.retention_interval(baseline.items, quantized.items, "answered")
        extra["answered_retention_ci"] = answered
        if answered:  # (a baseline that never answers leaves nothing to retain)
            fallback = ("answer-format retention, 95% CI upper bound", answered[1], gate["retention_min"])
    threshold = 1 / gate["ppl_ratio_max"] if lower_is_better(metric) else gate["retention_min"]
    verdict = retention_verdict(metric, base_value, quant_value, interval, baseline.n, threshold, informative,
                          fallback, gate["strict"])
    if "mean_kld" in quantized.metrics:
        extra.update({k: quantized.metrics[k] for k in DIVERGENCE_METRICS})
        verdict = judge_divergence(verdict, quantized.metrics, gate.get("kld_max"), gate.get("same_top_min"))
    return Comparison(case, metric, baseline, quantized, value, interval, verdict, extra)


def task_metrics(case: Case) -> list[str]:
    """The metrics a task reports, the headline first."""
    if case.task.kind == "generate":
        return list(case.task["extract"])
    return ["ndcg@10", "mrr@10"] if case.task.kind == "rerank" else [case.task.metric]


def headline_metric(case: Case) -> str:
    return task_metrics(case)[0]
