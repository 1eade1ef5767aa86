"""From a written report (``reports/latest.json``) to decisions: each quant config as a point (bytes, decode speed,
retention per task with its interval, mean KLD), the Pareto frontier, and the config to ship under constraints,
judged on the retention interval's lower bound the way the gates are."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from quant.config import ConfigError
from quant.figures import headline_rows, pyplot, save

AVERAGE = "informative"  # --task value: the mean retention over the tasks that are informative for the model
SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclasses.dataclass
class Point:
    model: str
    quant: str
    bytes: float
    decode_speedup: float | None
    retention: dict[str, tuple[float, float, float]]  # task -> (value, interval low, interval high)
    mean_kld: float | None

    def score(self, task: str) -> tuple[float, float, float] | None:
        """Retention on ``task`` or, for ``AVERAGE``, the mean over the informative tasks (bounds averaged too)."""
        if task != AVERAGE:
            return self.retention.get(task)
        if not self.retention:
            return None
        values = list(self.retention.values())
        return tuple(sum(v[i] for v in values) / len(values) for i in range(3))  # type: ignore[return-value]


def load_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no report; run `make report` (python -m quant report) first")
    return json.loads(path.read_text())


def points(report: dict[str, Any], model: str) -> tuple[list[Point], Point]:
    """One point per quant config of ``model`` and the baseline. Each task counts with its headline metric (its
    first row); a task that is *uninformative* for the model carries no retention (there is nothing to trade)."""
    rows = [r for r in report["rows"] if r["model"] == model and not r.get("skipped_reason")]
    if not rows:
        models = sorted({r["model"] for r in report["rows"] if not r.get("skipped_reason")})
        raise ConfigError(f"no measured rows for model {model!r} in the report; measured: {models}")
    speed = {p["quant"]: p.get("decode_speedup") for p in report.get("performance", []) if not p.get("skipped_reason")}
    found = []
    for quant in dict.fromkeys(r["quant"] for r in rows):
        config_rows = [r for r in rows if r["quant"] == quant]
        headline = {r["task"]: r for r in headline_rows({"rows": config_rows})}
        retention = {task: (r["retention"], r["retention_ci_low"], r["retention_ci_high"])
                     for task, r in headline.items()
                     if r["verdict"] != "uninformative" and r["retention_ci_low"] is not None}
        kld = next((r["mean_kld"] for r in config_rows if r.get("mean_kld") is not None), None)
        found.append(Point(model, quant, config_rows[0]["model_bytes_quantized"], speed.get(quant), retention, kld))
    tasks = {task for point in found for task in point.retention}
    baseline = Point(model, "baseline", rows[0]["model_bytes_baseline"], 1.0, dict.fromkeys(tasks, (1.0, 1.0, 1.0)), 0.0)
    return found, baseline


def frontier(candidates: list[Point], task: str) -> list[Point]:
    """The Pareto frontier of bytes (fewer is better) against retention on ``task`` (higher is better), or against
    mean KLD (lower is better) when ``task`` is "kld"; smallest first."""
    def quality(point: Point) -> float | None:
        if task == "kld":
            return None if point.mean_kld is None else -point.mean_kld
        score = point.score(task)
        return None if score is None else score[0]

    scored = sorted((p for p in candidates if quality(p) is not None), key=lambda p: (p.bytes, -quality(p)))
    kept: list[Point] = []
    for point in scored:
        if not kept or quality(point) > quality(kept[-1]):
            kept.append(point)
    return kept


def parse_size(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = (match.group(2) or "b").lower() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise ConfigError(f"--max-memory {text!r}: give a size like 150MB, 1.5GB or 200MiB")
    return float(match.group(1)) * SIZE_UNITS[unit]


@dataclasses.dataclass
class Recommendation:
    chosen: Point | None
    unmet: list[str]          # with no config chosen: the constraints no config meets
    closest: Point | None     # ... and the config that misses the fewest, by the least (relative to each bound)

    def lines(self, task: str) -> list[str]:
        if self.chosen is not None:
            return [f"ship {self.chosen.quant}: {_describe(self.chosen, task)}"]
        lines = ["no config meets every constraint; " + (
            "none meets: " + "; ".join(self.unmet) if self.unmet else "each is met by some config, never all at once")]
        if self.closest is not None:
            lines.append(f"closest: {self.closest.quant}: {_describe(self.closest, task)}")
        return lines


def _describe(point: Point, task: str) -> str:
    score = point.score(task)
    retention = "no informative retention" if score is None else \
        f"retention on {task} {score[0]:.3f} [95% CI {score[1]:.3f}, {score[2]:.3f}]"
    speed = "not timed" if point.decode_speedup is None else f"decode {point.decode_speedup:.2f}x the baseline"
    kld = "" if point.mean_kld is None else f", mean KLD {point.mean_kld:.4f}"
    return f"{point.bytes / 1e6:.0f} MB, {retention}, {speed}{kld}"


def recommend(candidates: list[Point], task: str, max_bytes: float | None = None, min_retention: float | None = None,
              min_decode_speedup: float | None = None) -> Recommendation:
    """The config that meets every constraint with the highest retention lower bound on ``task`` (then the
    smallest); retention is judged on the interval's lower bound, as the gates judge it."""
    def shortfalls(point: Point) -> dict[str, float]:
        """Each constraint the point misses, with how far it misses, relative to the bound."""
        missed = {}
        if max_bytes is not None and point.bytes > max_bytes:
            missed[f"memory <= {max_bytes / 1e6:.0f} MB"] = point.bytes / max_bytes - 1
        score = point.score(task)
        if min_retention is not None and (score is None or score[1] < min_retention):
            low = score[1] if score else 0.0
            missed[f"retention lower bound on {task} >= {min_retention}"] = 1 - low / min_retention
        speedup = point.decode_speedup or 0.0
        if min_decode_speedup is not None and speedup < min_decode_speedup:
            missed[f"decode speed-up >= {min_decode_speedup}"] = 1 - speedup / min_decode_speedup
        return missed

    def rank(point: Point) -> tuple[float, float]:
        score = point.score(task)
        return (-(score[1] if score else float("-inf")), point.bytes)

    passing = sorted((p for p in candidates if not shortfalls(p)), key=rank)
    if passing:
        return Recommendation(passing[0], [], None)
    unmet = [c for c in dict.fromkeys(m for p in candidates for m in shortfalls(p))
             if all(c in shortfalls(p) for p in candidates)]
    closest = min(candidates, key=lambda p: (len(shortfalls(p)), sum(shortfalls(p).values())), default=None)
    return Recommendation(None, unmet, closest)


def plot_pareto(candidates: list[Point], baseline: Point, task: str, path: Path) -> Path:
    """Two panels: quality against bytes and against decode speed-up, the bytes frontier drawn, the baseline
    marked. Quality is retention on ``task`` (with its interval) or mean KLD for "kld"."""
    plt = pyplot()
    kld = task == "kld"
    label = "mean KLD to the baseline (lower is better)" if kld else f"retention on {task} (95% CI)"

    def y(point: Point) -> tuple[float, float, float] | None:
        if kld:
            return None if point.mean_kld is None else (point.mean_kld, point.mean_kld, point.mean_kld)
        return point.score(task)

    shown = [p for p in candidates if y(p) is not None]
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, x_of, x_label in ((axes[0], lambda p: p.bytes / 1e6, "model MB"),
                                (axes[1], lambda p: p.decode_speedup, "decode speed-up (× baseline)")):
        for point in shown:
            if x_of(point) is None:
                continue
            value, low, high = y(point)
            axis.errorbar(x_of(point), value, yerr=[[value - low], [high - value]], fmt="o", capsize=3)
            axis.annotate(point.quant, (x_of(point), value), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.plot(x_of(baseline), 0.0 if kld else 1.0, "k*", markersize=12, label="baseline")
        axis.set_xlabel(x_label)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    line = frontier(candidates, task)
    axes[0].plot([p.bytes / 1e6 for p in line], [y(p)[0] for p in line], "r--", label="Pareto frontier")
    axes[0].legend()
    return save(figure, f"{baseline.model}: quality against size and speed ({len(shown)} configs)", path)


def spearman(x: list[float], y: list[float], exact_up_to: int = 8, permutations: int = 20_000) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p-value under no association: every permutation of ``y``
    counted for n <= ``exact_up_to``, else a seeded sample of ``permutations`` of them."""
    import itertools
    import random

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        ranked = [0.0] * len(values)
        i = 0
        while i < len(order):  # ties share the mean of their ranks
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                ranked[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return ranked

    def pearson(a: list[float], b: list[float]) -> float:
        mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
        cov = sum((p - mean_a) * (q - mean_b) for p, q in zip(a, b))
        spread = (sum((p - mean_a) ** 2 for p in a) * sum((q - mean_b) ** 2 for q in b)) ** 0.5
        return cov / spread if spread else 0.0

    rx, ry = ranks(x), ranks(y)
    rho = pearson(rx, ry)
    if len(x) <= exact_up_to:
        shuffles = list(itertools.permutations(ry))
    else:
        rng = random.Random(0)
        shuffles = [rng.sample(ry, len(ry)) for _ in range(permutations)]
    extreme = sum(abs(pearson(rx, list(s))) >= abs(rho) - 1e-12 for s in shuffles)
    return rho, extreme / len(shuffles)


def correlations(report: dict[str, Any], model: str, reference: str = "wikitext") -> list[dict[str, Any]]:
    """Across the model's configs: Spearman's rho between the perplexity ratio (quantized / baseline, from the
    ``reference`` task's retention) or the mean KLD, and each other task's retention; a task that is uninformative
    for the model (every config's row) is named, not correlated."""
    rows = [r for r in report["rows"] if r["model"] == model and not r.get("skipped_reason")]
    first = {(r["quant"], r["task"]): r for r in headline_rows({"rows": rows})}
    configs = [q for q in dict.fromkeys(r["quant"] for r in rows) if (q, reference) in first]
    predictors = {
        "perplexity ratio": {q: 1 / first[(q, reference)]["retention"] for q in configs},
        "mean KLD": {q: first[(q, reference)]["mean_kld"] for q in configs
                     if first[(q, reference)].get("mean_kld") is not None},
    }
    table = []
    for task in dict.fromkeys(r["task"] for r in rows):
        if task == reference:
            continue
        task_rows = {q: first[(q, task)] for q in configs if (q, task) in first}
        if all(r["verdict"] == "uninformative" for r in task_rows.values()):
            table.append({"task": task, "note": "uninformative for this model: not correlated"})
            continue
        for name, predictor in predictors.items():
            shared = [q for q in task_rows if q in predictor and task_rows[q]["retention"] is not None]
            if len(shared) < 3:
                table.append({"task": task, "predictor": name, "n": len(shared), "note": "fewer than 3 configs"})
                continue
            rho, p = spearman([predictor[q] for q in shared], [task_rows[q]["retention"] for q in shared])
            table.append({"task": task, "predictor": name, "n": len(shared), "rho": rho, "p": p})
    return table
