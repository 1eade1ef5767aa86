"""Benchmark histories: the runs pytest-benchmark saved (``--benchmark-autosave``, under ``.benchmarks/``) as one
PNG with a panel per figure (latency, throughput, memory, score, retention) and a point per saved run, each run
labelled with its number and the commit it measured; and the comparison of the newest run with the one before it,
which claims a regression only when the whole interval of the time ratio lies beyond the threshold."""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quant.config import ConfigError
from quant.figures import pyplot, save

Benchmark = dict[str, Any]

# panel title -> (series name, value) pairs read from one saved benchmark
FIGURES: dict[str, Callable[[Benchmark], list[tuple[str, float]]]] = {
    "latency, median (ms)": lambda b: [(b["param"], b["stats"]["median"] * 1000)],
    "throughput (tokens/s)": lambda b: [(b["param"], b["extra_info"]["tokens_per_s"])]
    if "tokens_per_s" in b["extra_info"] else [],
    "model memory (MB)": lambda b: [(b["extra_info"]["variant"], b["extra_info"]["model_bytes"] / 1e6)]
    if "model_bytes" in b["extra_info"] else [],
    "score": lambda b: _prefixed(b, "score."),
    "retention": lambda b: _prefixed(b, "retention."),
}


def _prefixed(benchmark: Benchmark, prefix: str) -> list[tuple[str, float]]:
    info = benchmark["extra_info"]
    return [(f"{info.get('variant', benchmark['param'])} {key.removeprefix(prefix)}", value)
            for key, value in info.items() if key.startswith(prefix)]


def load_runs(storage: Path) -> list[dict[str, Any]]:
    """Saved runs, oldest first (pytest-benchmark numbers them 0001, 0002, ... per machine folder)."""
    files = sorted(storage.glob("*/*.json"), key=lambda path: (path.parent.name, path.name))
    if not files:
        raise ConfigError(f"no saved benchmark runs under {storage}: run `make bench` (pytest tests/benchmarks "
                                "--benchmark-autosave) first")
    return [json.loads(path.read_text()) | {"file": path.name} for path in files]


def run_label(run: dict[str, Any]) -> str:
    commit = run.get("commit_info", {})
    short = (commit.get("id") or "no-git")[:7] + ("+" if commit.get("dirty") else "")
    return f"{run['file'].split('_')[0]}\n{short}"


def series(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """panel -> series -> {run index: value}. Timings are keyed by the benchmark's parameters (variant and
    phase); memory and quality by variant, which the prefill and decode benchmarks of a run share."""
    panels: dict[str, dict[str, dict[int, float]]] = {title: defaultdict(dict) for title in FIGURES}
    for index, run in enumerate(runs):
        for benchmark in run["benchmarks"]:
            benchmark = {**benchmark, "param": benchmark.get("param") or benchmark["name"]}
            for title, read in FIGURES.items():
                for name, value in read(benchmark):
                    panels[title][name][index] = value
    return panels


def plot(storage: Path, out: Path) -> Path:
    """Write the history PNG; returns its path."""
    plt = pyplot()
    runs = load_runs(storage)
    panels = {title: lines for title, lines in series(runs).items() if lines}
    figure, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for axis, (title, lines) in zip(axes[:, 0], panels.items()):
        for name, points in sorted(lines.items()):
            axis.plot(*zip(*sorted(points.items())), marker="o", label=name)
        axis.set_title(title)
        axis.set_xticks(range(len(runs)), [run_label(run) for run in runs], fontsize=7)
        axis.legend(fontsize=6, ncol=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axis.grid(alpha=0.3)
    return save(figure, f"benchmark history: {len(runs)} saved runs in {storage}", out)


@dataclasses.dataclass(frozen=True)
class Change:
    """One benchmark's time in the newer run against the older: the ratio of medians and its interval, the range
    of every round of the new run over every round of the old (new min / old max, new max / old min)."""

    name: str
    old_median: float
    new_median: float
    ratio: float
    low: float
    high: float

    def verdict(self, threshold: float) -> str:
        if self.low > 1 + threshold:
            return "regression"
        if self.high < 1 / (1 + threshold):
            return "faster"
        return "within noise" if self.low <= 1 <= self.high else "changed, within the threshold"


def compare_runs(older: dict[str, Any], newer: dict[str, Any]) -> list[Change]:
    """The benchmarks both runs hold, by name. Each run's rounds spread with the machine's load at the time, so a
    median ratio alone reads a busy runner as a regression; the interval counts that spread."""
    before = {b["fullname"]: b["stats"] for b in older["benchmarks"]}
    changes = []
    for benchmark in newer["benchmarks"]:
        old, new = before.get(benchmark["fullname"]), benchmark["stats"]
        if old is None:
            continue
        changes.append(Change(benchmark["fullname"], old["median"], new["median"], new["median"] / old["median"],
                              new["min"] / old["max"], new["max"] / old["min"]))
    return changes
