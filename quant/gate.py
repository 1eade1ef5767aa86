"""The gate: the one place the policy lives. From two results on the same items (a baseline's and a candidate's) to a
verdict: the paired statistics, the retention rule and the divergence bounds, applied to what the task's kind says
(its metrics, whether its baseline is informative and the fallback signal when it is not). Pure (no model, no cache,
no file) and outside the cache key: changing how a verdict is reached or worded reuses every cached model and
result."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from quant import stats
from quant.informative import informativeness as informativeness_of
from quant.kinds import TaskResult, kind_of, lower_is_better
from quant.kinds.perplexity import DIVERGENCE_METRICS
from quant.matrix import Case


Z_GATE = 1.959964  # the gate's two-sided 95% interval: a fail is a one-sided 2.5% decision
Z_POWER = 0.841621  # 80% power


def threshold_of(gate: dict[str, Any], metric: str) -> float:
    """The retention a case must keep: ``retention_min``, or 1 / ``ppl_ratio_max`` for a lower-is-better metric."""
    return 1 / gate["ppl_ratio_max"] if lower_is_better(metric) else gate["retention_min"]


def detectable_drop(spread: float, n: int, threshold: float) -> float:
    """The smallest drop of retention below 1 that the gate fails with 80% probability at ``n`` items, when the
    retention's standard error is ``spread / sqrt(n)`` (``spread``: the per-item standard deviation of the paired
    retention, measured or the matrix's prior). The gate fails when its interval's upper bound, about z_0.975
    standard errors above the estimate, lies below the threshold, so a true retention (z_0.975 + z_0.8) standard
    errors below the threshold is failed 80% of the time."""
    return 1 - threshold + (Z_GATE + Z_POWER) * spread / math.sqrt(n)


def items_to_detect(drop: float, spread: float, threshold: float) -> int | None:
    """The items at which ``detectable_drop`` reaches ``drop``; None when no count does (a drop within the
    threshold's own margin passes the gate by design)."""
    margin = drop - (1 - threshold)
    return math.ceil(((Z_GATE + Z_POWER) * spread / margin) ** 2) if margin > 0 else None


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
    value = stats.retention(baseline_value, quant_value, lower_is_better=lower_is_better(metric))
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
    # one-sided bootstrap p-value of "retention >= threshold", for informative gates (the joint verdict's input)
    p_value: float | None = None


def judge(case: Case, baseline: TaskResult, quantized: TaskResult, metric: str | None = None) -> Comparison:
    """The statistics and the gate's verdict for two results on the same items."""
    kind = kind_of(case.task)
    metric = metric or headline_metric(case)
    stats.same_items(baseline.items, quantized.items)
    base_value, quant_value = baseline.metrics[metric], quantized.metrics[metric]
    lower = lower_is_better(metric)
    value = stats.retention(base_value, quant_value, lower_is_better=lower)
    base_columns, quant_columns = kind.columns(baseline.items), kind.columns(quantized.items)
    ratios = stats.bootstrap_retentions(base_columns, quant_columns, kind.aggregate(metric), lower_is_better=lower)
    interval = stats.interval_of(ratios) if ratios is not None else None
    extra: dict[str, Any] = {"agreement": None}
    if kind.answer(baseline.items[0]) is not None:
        extra["agreement"] = stats.agreement([kind.answer(r) for r in baseline.items],
                                             [kind.answer(r) for r in quantized.items])
    if "correct" in base_columns:
        extra["flips"] = stats.flips(base_columns["correct"], quant_columns["correct"])
        extra["mcnemar_p"] = stats.mcnemar_exact(extra["flips"]["correct_to_wrong"], extra["flips"]["wrong_to_correct"])
    informativeness = informativeness_of(case.task, case.gate, metric, baseline.metrics, base_columns, quant_columns)
    extra.update(informativeness.signals)
    gate = case.gate
    threshold = threshold_of(gate, metric)
    if informativeness.informative and ratios is not None:
        extra["spread"] = float(ratios.std() * math.sqrt(baseline.n))
        extra["detectable_drop"] = detectable_drop(extra["spread"], baseline.n, threshold)
    verdict = retention_verdict(metric, base_value, quant_value, interval, baseline.n, threshold,
                                informativeness.informative, informativeness.fallback, gate["strict"])
    if "mean_kld" in quantized.metrics:
        extra.update({k: quantized.metrics[k] for k in DIVERGENCE_METRICS})
        verdict = judge_divergence(verdict, quantized.metrics, gate.get("kld_max"), gate.get("same_top_min"))
    p_value = stats.p_at_least(ratios, threshold) if informativeness.informative and ratios is not None else None
    return Comparison(case, metric, baseline, quantized, value, interval, verdict, extra, p_value)


JOINT_ALPHA = 0.025  # one-sided, as each case's gate: its 95% interval's upper bound below the threshold


@dataclasses.dataclass
class JointVerdict:
    """One verdict for a whole run: the informative gates' p-values under Holm's correction (the family-wise
    false-fail rate held at JOINT_ALPHA however many cases ran), beside the per-case verdicts."""

    gates: int  # informative gates combined
    failing: list[str]  # gates that fail after the correction
    failing_uncorrected: list[str]  # gates whose own p-value is below JOINT_ALPHA
    other_fails: list[str]  # per-case fails outside the combination (fallback signals, divergence bounds, strict)

    @property
    def status(self) -> str:
        return "fail" if self.failing or self.other_fails else "pass"

    def line(self) -> str:
        if not self.gates and not self.other_fails:
            return "this change: no informative gate ran, nothing to combine"
        combined = (f"{len(self.failing)} of {self.gates} informative gates fail after Holm's correction"
                    + (f": {', '.join(self.failing)}" if self.failing else ""))
        if len(self.failing_uncorrected) > len(self.failing):
            combined += f" ({len(self.failing_uncorrected)} before it)"
        cases = "1 case fails" if len(self.other_fails) == 1 else f"{len(self.other_fails)} cases fail"
        other = f"; {cases} on a bound outside it: {', '.join(self.other_fails)}" if self.other_fails else ""
        return f"this change: {self.status}, {combined}{other}"


def joint_verdict(gates: list[tuple[str, float | None, str]], alpha: float = JOINT_ALPHA) -> JointVerdict:
    """``gates``: (case id, p-value or None, per-case status) for each case's headline gate. Cases with a p-value
    are combined by Holm's step-down procedure; a per-case fail that its p-value does not explain (an
    uninformative row's fallback signal, a divergence bound, a strict straddle) counts on its own."""
    p_values = {name: p for name, p, _ in gates if p is not None}
    return JointVerdict(len(p_values), stats.holm(p_values, alpha),
                        sorted(name for name, p in p_values.items() if p <= alpha),
                        sorted(name for name, p, status in gates if status == "fail" and (p is None or p > alpha)))


@functools.lru_cache(maxsize=64)
def sequential_design(sizes: tuple[int, ...]) -> stats.GroupSequential:
    """The group sequential test of a gate that looks at ``sizes`` items."""
    return stats.GroupSequential([size / sizes[-1] for size in sizes], JOINT_ALPHA)


def settle(comparison: Comparison, sizes: list[int], look: int) -> Comparison | None:
    """A group sequential gate (``stats.GroupSequential``) at ``look`` (from 0) of the item counts ``sizes``: the
    comparison on the first ``sizes[look]`` items, with its verdict and p-value decided by the boundary of that look,
    or None to evaluate the next span. Each direction errs at most JOINT_ALPHA over all looks, as the fixed gate
    at the profile's n does: a pass or a fail at an early look is as trustworthy as one at the end.

    Chosen over an anytime-valid confidence sequence because the looks are known in advance (the cache's spans):
    the spending boundaries give nearly the fixed test's power at the last look (2.06 against 1.96 standard errors
    for six looks), where Robbins' normal-mixture confidence sequence, valid at every item and tuned for the last
    one, needs about 3.0.

    The statistic is the retention's distance to the threshold in bootstrap standard errors. At an early look the
    per-item spread is taken as at least the matrix's ``spread_prior`` for the task: a few items can show no
    discordant pair at all (a spread of 0, so any distance looks infinitely significant), which the bootstrap cannot
    see. A gate that is not informative (its baseline near chance), or has no interval, is not stopped early. A
    pass at an early look also needs the divergence bounds to hold; they are plain bounds and fail only at the last
    look."""
    last = look == len(sizes) - 1
    spread = comparison.extra.get("spread")
    if len(sizes) == 1 or comparison.p_value is None or spread is None:
        return comparison if last else None
    gate = comparison.case.gate
    if not last:
        spread = max(spread, gate.get("spread_prior", {}).get(comparison.case.task.name, 0.0))
        if spread == 0:
            return None
    threshold = threshold_of(gate, comparison.metric)
    distance, standard_error = comparison.retention - threshold, spread / math.sqrt(comparison.baseline.n)
    z = distance / standard_error if standard_error > 0 else math.copysign(math.inf, distance)
    design = sequential_design(tuple(sizes))
    boundary = design.boundaries[look]
    where = f"look {look + 1} of {len(sizes)} (n={sizes[look]} of {sizes[-1]})"
    measured = f"retention {comparison.retention:.3f}, {z:+.2f} standard errors from {threshold:.3f}"
    if z <= -boundary:
        verdict = Verdict("fail", f"{where}: {measured}, beyond the fail boundary -{boundary:.2f}")
    elif z >= boundary:
        verdict = Verdict("pass", f"{where}: {measured}, beyond the pass boundary +{boundary:.2f}")
    elif not last:
        return None
    else:
        verdict = Verdict("fail" if gate["strict"] else "inconclusive",
                          f"{where}: {measured}, within the boundaries +-{boundary:.2f}")
    if "mean_kld" in comparison.quantized.metrics:
        bounded = judge_divergence(verdict, comparison.quantized.metrics, gate.get("kld_max"), gate.get("same_top_min"))
        if bounded.failed and not verdict.failed and not last:
            return None  # the divergence bounds are point estimates: they fail a case at its last look only
        verdict = bounded
    return dataclasses.replace(comparison, verdict=verdict, p_value=design.p_value(look, z))


def task_metrics(case: Case) -> list[str]:
    """The metrics a case's task is gated and reported on, the headline first."""
    return kind_of(case.task).metrics(case.task)


def headline_metric(case: Case) -> str:
    return task_metrics(case)[0]
