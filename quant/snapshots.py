"""Snapshot baselines: what a regression case records (``baselines/<hardware>/<profile>/``), and how a new run is
compared with it: metrics within a direction-aware tolerance, identities (item ids, config, packed bytes) exactly.

A record is plain JSON, so that it can be reviewed in a pull request like code:

    {"exact": {"items": "3f2a...", "config": "9b1c...", "model_bytes": 168912384, ...},
     "metrics": {"quantized.perplexity": {"value": 53.04, "worse": "higher", "tolerance": {"rel": 0.01}}, ...}}

The tolerance stored beside a value is documentation; the comparison uses the tolerance of the current run
(from matrix.yaml), so that loosening a tolerance does not require rewriting every snapshot.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import torch

from quant.config import ConfigError
from quant.kinds import lower_is_better

# The matrix cases' snapshots: <baselines>/<hardware>/<profile>/test_matrix.json (the project's baselines folder,
# quant.project), committed and reviewed. The name is the test module's that generated the cases before the plugin
# collected them from the matrix file itself, so that baselines recorded then still compare.
SNAPSHOT_FILE = "test_matrix.json"

SIGNIFICANT_DIGITS = 6  # stored precision: far below any tolerance, stable across reruns


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-able value: item ids, a quantization config."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def local_device() -> str:
    """Where GPU-tier models run on this machine: CUDA when torch sees it, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def hardware_class(device: str) -> str:
    """The snapshot folder for this machine: ``cpu``, or the GPU's model (``h100``, ``a100``, ``l4``...)."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for token in name.replace("-", " ").split():
        if any(c.isdigit() for c in token) and token[0].isalpha():
            return token
    return name.split()[-1]


# What --hardware may say: ``cpu``, or a GPU class as hardware_class derives it (letters then a digit: h100, a100,
# l4, rtx4090), optionally with lower-case suffixes for a variant of the run (h100-replica-small).
HARDWARE_NAME = re.compile(r"cpu|[a-z]+[0-9][a-z0-9]*(-[a-z0-9]+)*")


def check_hardware(name: str, detected: str | None) -> str:
    """``name`` if it is a hardware folder name that fits this machine (``detected``: this GPU's class, or None
    where there is no GPU to compare with); otherwise a ConfigError that says what to pass."""
    if not HARDWARE_NAME.fullmatch(name):
        raise ConfigError(f"--hardware {name!r}: not a hardware name; use cpu or a GPU class as detected (h100, a100, "
                          f"l4), optionally with a suffix (h100-replica)")
    if detected is not None and name.split("-")[0] != detected:
        raise ConfigError(f"--hardware {name!r} names {name.split('-')[0]}, but this machine's GPU is {detected}: "
                          f"use {detected} or {detected}-<suffix>")
    return name


def tolerance_allows(tolerance: dict[str, float], old: float, n: int | None) -> float:
    """How far ``new`` may move from ``old`` in the worse direction: ``abs``, ``rel`` (of ``old``) or ``items``
    (that many items out of ``n`` flipping, for per-item accuracies); the largest applies."""
    allowed = [0.0]
    if "abs" in tolerance:
        allowed.append(tolerance["abs"])
    if "rel" in tolerance:
        allowed.append(tolerance["rel"] * abs(old))
    if "items" in tolerance and n:
        allowed.append(tolerance["items"] / n)
    return max(allowed)


def metric_entry(name: str, value: float, tolerances: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A metric with the direction that counts as a regression. The baseline is the instrument, not the candidate:
    a baseline that moves either way means the model, the data or the task changed, and every gate's reference
    with it (a task change that raised the baseline passed every worse-only snapshot)."""
    side, metric = name.split(".", 1) if "." in name else (None, name)
    worse = "either" if side == "baseline" else "higher" if lower_is_better(metric) else "lower"
    return {"value": float(f"{value:.{SIGNIFICANT_DIGITS}g}"), "worse": worse, "tolerance": tolerances.get(metric, {})}


def record(exact: dict[str, Any], metrics: dict[str, float], tolerances: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A case's snapshot: identities compared exactly, metrics with their direction and tolerance."""
    return {"exact": dict(sorted(exact.items())),
            "metrics": {name: metric_entry(name, value, tolerances) for name, value in sorted(metrics.items())}}


def regressions(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why ``current`` is a regression from ``stored``, one readable line per reason; empty when it is not.

    A metric that moved in the better direction, or within the current tolerance, is not a regression; a
    baseline metric moves in no direction unnoticed.
    """
    problems = []
    for key in sorted(set(stored["exact"]) | set(current["exact"])):
        old, new = stored["exact"].get(key), current["exact"].get(key)
        if old != new:
            problems.append(f"{key}: must not change: snapshot {old!r}, now {new!r}")
    n = current["exact"].get("n")
    for name in sorted(set(stored["metrics"]) | set(current["metrics"])):
        if name not in current["metrics"]:
            problems.append(f"{name}: in the snapshot ({stored['metrics'][name]['value']}) but no longer measured")
            continue
        if name not in stored["metrics"]:
            problems.append(f"{name}: measured ({current['metrics'][name]['value']}) but not in the snapshot "
                            "(run pytest --snapshot-update to record it)")
            continue
        old, entry = stored["metrics"][name]["value"], current["metrics"][name]
        new, tolerance = entry["value"], entry["tolerance"]
        worsened = {"higher": new - old, "lower": old - new, "either": abs(new - old)}[entry["worse"]]
        allowed = tolerance_allows(tolerance, old, n)
        if math.isnan(new) or worsened > allowed:
            direction = "the baseline must not move" if entry["worse"] == "either" else f"{entry['worse']} is worse"
            problems.append(f"{name}: {old} -> {new} ({direction}): worse by {worsened:.6g}, "
                            f"tolerance {json.dumps(tolerance) if tolerance else 'none (exact)'} allows {allowed:.6g}")
    return problems


def snapshot_of(baseline: Any, candidate: Any, item_ids: list[str], config: dict[str, Any], packed_bytes: int,
                layer_counts: dict[str, int], tolerances: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A case's snapshot from its two results (``TaskResult``s on the same items): every metric of both, and the
    identities that must not move: the items, the quantization config, the packed model's bytes and layers."""
    exact = {"n": baseline.n, "items": fingerprint(item_ids), "config": fingerprint(config),
             "model_bytes": packed_bytes, **layer_counts}
    metrics = {f"{side}.{name}": value for side, result in (("baseline", baseline), ("quantized", candidate))
               for name, value in result.metrics.items()}
    return record(exact, metrics, tolerances)
