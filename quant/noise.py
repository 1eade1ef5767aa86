"""Snapshot tolerances from measured noise: every case rerun under changes that must not change a model's quality
(another thread count, another CPU code path, another evaluation batch size), each rebuilding its quantized models
where the change reaches the build, beside the committed snapshot (recorded on another machine), and each snapshot
metric's largest deviation from the unchanged run turned into a tolerance: ``MULTIPLE`` times it, never finer than
``RESOLUTION``. ``quant noise --write`` replaces the ``measured_tolerances`` section of matrix.yaml with what it
found and the run that found it (``source``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from quant.config import ConfigError
from quant.kinds import kind_of
from quant.matrix import Case, Matrix, load_matrix
from quant.pipeline import Workbench
from quant.snapshots import SNAPSHOT_FILE

log = logging.getLogger("quant")

MULTIPLE = 3  # a tolerance is this many times the largest deviation measured
# The finest tolerance written: one item for a count, else 1% relative or 0.01 absolute. Reruns on one CPU's code
# paths cannot show what another CPU's kernels do to a near-tie (a top token, a re-ranked passage): a deviation of 0
# here says the metric is stable on this machine, not that every machine reproduces it to the last digit.
RESOLUTION = {"rel": 0.01, "abs": 0.01, "items": 1}
SECTION = "measured_tolerances"
COMMITTED = "committed snapshot"  # the run recorded on the machine that last recorded baselines/cpu/


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A change that must not change a model's quality: environment variables for a fresh process (and a cache of
    its own, so that its models are built under the change), or a scaling of every task's evaluation batch."""

    name: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    batch_scale: int = 1

    @property
    def rebuilds(self) -> bool:
        return bool(self.env)


PERTURBATIONS = (
    Perturbation("one thread", {"OMP_NUM_THREADS": "1"}),
    Perturbation("AVX2 code path", {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}),
    Perturbation("batch x2", batch_scale=2),
)


def this_machine() -> str:
    """The CPU and the code path ATen runs on it, for a tolerance's ``source``."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()} x{os.cpu_count()} ({torch.backends.cpu.get_cpu_capability()})"


def cases_named(matrix: Matrix, case_ids: list[str]) -> list[Case]:
    """The cases ``case_ids`` name (none: the default cadence's CPU-tier cases); an unknown id is a ConfigError."""
    by_id = {case.id: case for case in matrix.cases}
    unknown = [case_id for case_id in case_ids if case_id not in by_id]
    if unknown:
        raise ConfigError(f"no case {unknown[0]!r} in {matrix.path}; ids look like {matrix.cases[0].id}")
    if case_ids:
        return [by_id[case_id] for case_id in case_ids]
    return [case for case in matrix.cases if case.cadence == "default" and case.model.tier == "cpu"]


def scaled_batches(matrix: Matrix, profile: str, tier: str, scale: int) -> Matrix:
    """The matrix with every task's evaluation batch size in ``profile`` times ``scale``."""
    limits = matrix.limits(profile, tier)
    options = {name: {**limits.get("options", {}).get(name, {}),
                      "batch_size": scale * task.get("batch_size", kind_of(task).default_batch_size)}
               for name, task in matrix.tasks.items()}
    profiles = {**matrix.profiles, profile: {**matrix.profiles[profile], tier: {**limits, "options": options}}}
    return dataclasses.replace(matrix, profiles=profiles)


def snapshot_values(matrix: Matrix, profile: str, cases: list[Case], data_dir: Path | None) -> dict[str, dict]:
    """Each case's snapshot metrics, {case id: {metric: value}}, and the items they were counted on."""
    workbench = Workbench(matrix, profile, data_dir)
    values = {}
    for number, case in enumerate(cases, start=1):
        log.info("noise: case %d/%d %s", number, len(cases), case.id)
        snapshot = workbench.snapshot(case)
        values[case.id] = {"n": snapshot["exact"]["n"],
                           "metrics": {name: entry["value"] for name, entry in snapshot["metrics"].items()}}
    return values


def run_perturbed(perturbation: Perturbation, profile: str, case_ids: list[str], matrix_file: Path,
                  data_dir: Path | None, cache_root: Path) -> dict[str, dict]:
    """``snapshot_values`` in a fresh process under the perturbation's environment and its own cache."""
    env = {**os.environ, **perturbation.env, "QUANT_CACHE_DIR": str(cache_root / perturbation.name.replace(" ", "-"))}
    command = [sys.executable, "-m", "quant.noise", "--profile", profile, "--matrix", str(matrix_file),
               *(["--data-dir", str(data_dir)] if data_dir else []), *case_ids]
    log.info("noise: %s (%s)", perturbation.name, " ".join(f"{k}={v}" for k, v in perturbation.env.items()))
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(command, env=env, stdout=out, check=False)
        out.seek(0)
        if done.returncode:
            raise RuntimeError(f"noise run '{perturbation.name}' failed with exit {done.returncode}: {' '.join(command)}")
        return json.loads(out.read())


def committed_values(profile: str, cases: list[Case], baselines: Path) -> dict[str, dict]:
    """The committed CPU snapshots of ``cases`` (``baselines/cpu/<profile>/test_matrix.json``) in the shape of
    ``snapshot_values``: recorded on another machine, they are the cross-machine noise no rerun here can show."""
    path = baselines / "cpu" / profile / SNAPSHOT_FILE
    stored = json.loads(path.read_text()) if path.exists() else {}
    return {case.id: {"n": entry["exact"]["n"], "metrics": {k: v["value"] for k, v in entry["metrics"].items()}}
            for case in cases if (entry := stored.get(f"test_snapshot[{case.id}]"))}


def measure(matrix: Matrix, profile: str, cases: list[Case], data_dir: Path | None, cache_root: Path,
            baselines: Path) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
    """The unchanged run (this process, the usual cache), each perturbed run of ``cases``' snapshots and the
    committed snapshots under ``baselines`` where there are some."""
    reference = snapshot_values(matrix, profile, cases, data_dir)
    runs = {COMMITTED: committed_values(profile, cases, baselines)}
    for perturbation in PERTURBATIONS:
        if perturbation.rebuilds:
            runs[perturbation.name] = run_perturbed(perturbation, profile, [c.id for c in cases], matrix.path,
                                                    data_dir, cache_root)
        else:
            scaled = scaled_batches(matrix, profile, "cpu", perturbation.batch_scale)
            log.info("noise: %s", perturbation.name)
            runs[perturbation.name] = snapshot_values(scaled, profile, cases, data_dir)
    return reference, runs


Deviations = dict[str, dict[str, tuple[float, str]]]  # case id -> metric -> (largest deviation, the run that gave it)


def table(cases: list[Case], found: Deviations, tolerances: dict[str, dict[str, dict[str, float]]]) -> str:
    """What each metric moved by (``deviations``), under which change, and the tolerance before and after."""
    lines = ["| case | metric | largest deviation | under | tolerance before | measured tolerance |", "|---|---|---|---|---|---|"]
    for case in cases:
        for metric, tolerance in tolerances[case.id].items():
            deviation, under = found[case.id][metric]
            before = case.gate["snapshot_tolerance"].get(metric)
            lines.append(f"| {case.id} | {metric} | {deviation:.3g} | {under} | {json.dumps(before) if before else 'exact'} "
                         f"| {json.dumps(tolerance)} |")
    return "\n".join(lines)


def deviations(reference: dict[str, dict], runs: dict[str, dict[str, dict]]) -> Deviations:
    """For each case and metric (baseline and quantized sides together), the largest absolute deviation of any
    perturbed run from the reference, and the perturbation that gave it."""
    found: Deviations = {}
    for case_id, own in reference.items():
        for name, value in own["metrics"].items():
            metric = name.split(".", 1)[1]
            for perturbation, values in runs.items():
                if name not in values.get(case_id, {}).get("metrics", {}):
                    continue  # a case or metric the committed snapshots do not hold
                deviation = abs(values[case_id]["metrics"][name] - value)
                if deviation >= found.setdefault(case_id, {}).get(metric, (-1.0, ""))[0]:
                    found[case_id][metric] = (deviation, perturbation)
    return found


def tolerance_from(deviation: float, kind: str, value: float, n: int) -> float:
    """``MULTIPLE`` times ``deviation`` in the tolerance's own unit, at least ``RESOLUTION``."""
    if kind == "items":
        return max(RESOLUTION["items"], math.ceil(MULTIPLE * deviation * n - 1e-9))
    scaled = MULTIPLE * deviation / abs(value) if kind == "rel" else MULTIPLE * deviation
    return max(RESOLUTION[kind], float(f"{scaled:.2g}"))


def measured_tolerances(cases: list[Case], reference: dict[str, dict], found: Deviations
                        ) -> dict[str, dict[str, dict[str, float]]]:
    """Per case, each metric that has a tolerance in the matrix, or that moved: its tolerance in the matrix's unit
    (absolute where it has none) from the measured deviation (``deviations``)."""
    tolerances = {}
    for case in cases:
        own = {}
        for metric, (deviation, _) in sorted(found[case.id].items()):
            current = case.gate["snapshot_tolerance"].get(metric)
            if not current and deviation == 0:
                continue  # exact, and exact in every run: it stays exact
            kind = next((k for k in ("items", "rel", "abs") if k in (current or {})), "abs")
            value = max(abs(v) for name, v in reference[case.id]["metrics"].items() if name.endswith("." + metric))
            own[metric] = {kind: tolerance_from(deviation, kind, value, reference[case.id]["n"])}
        tolerances[case.id] = own
    return tolerances


def section_text(tolerances: dict[str, dict[str, dict[str, float]]], source: str) -> str:
    """The ``measured_tolerances`` section of matrix.yaml, one flow mapping per case."""
    lines = [f"# Written by `python -m quant noise --write`: {MULTIPLE}x the largest deviation of any perturbed run from",
             "# the unchanged one, at least 1 item, 1% or 0.01; these replace the cases' snapshot_tolerance metric by metric.",
             f"{SECTION}:", f"  source: {json.dumps(source)}", "  cases:"]
    for case_id, own in tolerances.items():
        entries = ", ".join(f"{metric}: {{{kind}: {value}}}" for metric, tol in own.items() for kind, value in tol.items())
        lines.append(f"    {case_id}: {{{entries}}}")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace matrix.yaml's ``measured_tolerances`` section, its last (from its first comment line to the end of
    the file), by ``text``, or append it; everything before it, comments included, is kept as it is."""
    content = path.read_text()
    start = content.find("# Written by `python -m quant noise")
    kept = content[:start] if start >= 0 else content.rstrip("\n") + "\n\n"
    path.write_text(kept + text)


def _worker(argv: list[str]) -> int:
    """The perturbed process: prints ``snapshot_values`` as JSON on stdout (progress goes to stderr)."""
    parser = argparse.ArgumentParser(prog="python -m quant.noise")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--matrix", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    matrix = load_matrix(args.matrix)
    print(json.dumps(snapshot_values(matrix, args.profile, cases_named(matrix, args.cases), args.data_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
