"""What a run will do, before it runs (``quant report --dry-run``, ``pytest --plan``): per model the quant configs,
tasks and item counts, the calibration size, the kernel each config will be served on, the snapshot folder its
cases compare with, an estimated time per step from the measured costs in matrix.yaml (``costs``), and what each
case's gate can see (its detectable drop). A step with no measured cost says so; the total then counts only what
was measured."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from quant.config import QuantConfig, UserError
from quant.data import missing_files
from quant.gate import detectable_drop, headline_metric, items_to_detect, sequential_design, threshold_of
from quant.kernels import INT8_KERNELS, KERNEL_GROUP_SIZES, KERNELS
from quant.kinds import kind_of
from quant.kinds.harness import offline_problem
from quant.matrix import Case, Matrix
from quant.pipeline import Workbench
from quant.backends import get_backend
from quant.replicas import REPLICAS
from quant.snapshots import hardware_class
from quant.stores import look_sizes
from quant.tasks import HARNESS


@dataclasses.dataclass
class Step:
    model: str
    what: str
    seconds: float | None  # None: no measured cost for this step on this hardware
    note: bool = False  # a detail of the step before it (no time of its own)


def kernel_label(config: QuantConfig, device: str) -> str:
    """The kernel a config's layers are served on (layers whose width does not tile stay on the reference)."""
    if config.checkpoint or config.backend:
        return f"the kernel {'its package' if config.checkpoint else config.backend} picks when it loads"
    if config.bits == 4 and (config.group_size or 0) in KERNEL_GROUP_SIZES and device in KERNELS:
        return KERNELS[device].name
    if config.bits == 8 and config.group_size is None and config.sym and device in INT8_KERNELS:
        return INT8_KERNELS[device]
    why = {4: f"group size {config.group_size}", 8: "8-bit in groups or asymmetric"}.get(config.bits, f"{config.bits}-bit")
    return f"dequantizing reference ({why})"


def _blocks(model: str) -> int | None:
    replica = REPLICAS.get(model)
    return replica.full["num_hidden_layers"] if replica else None


def power_line(case: Case, items: int, measured: float | None) -> str:
    """What the case's gate can see at ``items``: the smallest retention drop it fails with 80% power, from the
    spread measured on cached results or else the matrix's prior; with ``detect:``, the items that reach it."""
    metric = headline_metric(case)
    threshold = threshold_of(case.gate, metric)
    spread = measured if measured is not None else case.gate.get("spread_prior", {}).get(case.task.name)
    if spread is None:
        return f"  {case.quant_name}: detectable drop unknown (no cached results, no spread_prior for {case.task.name})"
    source = "measured on cached results" if measured is not None else "spread_prior"
    drop = detectable_drop(spread, items, threshold)
    sees = (f"detects a drop of {drop:.3f} in {metric} retention with 80% power" if drop < 1
            else f"detects no drop in {metric} retention with 80% power")
    line = f"  {case.quant_name}: {sees} at n={items} (threshold {threshold:.3f}; per-item spread {spread:.3g}, {source})"
    if case.gate.get("detect") is not None:
        needed = items_to_detect(case.gate["detect"], spread, threshold)
        reach = ("no n reaches it (within the threshold's own margin)" if needed is None
                 else f"needs n={needed}" + (", more than the profile runs" if needed > items else ""))
        line += f"; detect {case.gate['detect']}: {reach}"
    looks = look_sizes(items)
    if case.gate["sequential"] and len(looks) > 1 and spread > 0:
        design = sequential_design(tuple(looks))
        unchanged = design.expected_fraction((1 - threshold) / (spread / math.sqrt(items))) * items
        line += (f"; sequential: looks at n={', '.join(map(str, looks))}, about n={unchanged:.0f} expected when "
                 "nothing is lost")
    return line


def steps(matrix: Matrix, cases: list[Case], profile: str, tier: str, device: str, hardware: str, baselines: Path,
          spreads: dict[str, float] | None = None) -> list[Step]:
    """The plan's steps, comparing with the snapshots under ``baselines`` (the project's); ``spreads`` (case id -> per-item spread measured on cached results) sharpen the
    detectable drops, which otherwise come from the matrix's ``spread_prior``."""
    spreads = spreads or {}
    costs = matrix.costs.get(hardware, {})
    plan: list[Step] = []
    for spec in dict.fromkeys(case.model for case in cases):
        own = [c for c in cases if c.model is spec]
        limits = matrix.limits(profile, tier)
        plan.append(Step(spec.name, f"load {spec.hf_id or spec.gguf_file} ({spec.dtype})", costs.get("load")))
        for quant_name in dict.fromkeys(c.quant_name for c in own):
            config = matrix.quant[quant_name]
            if config.checkpoint:
                seconds, what = costs.get("load"), f"load checkpoint {quant_name} ({config.checkpoint})"
            elif get_backend(config.backend).needs_calibration(config):
                samples = limits.get("calib_samples", config.calib_samples)
                per_block = costs.get("calib_block_128x512", {}).get(spec.name)
                blocks = _blocks(spec.name)
                seconds = per_block * blocks * samples / 128 if per_block and blocks else None
                chunk = limits.get("calib_chunk", config.calib_chunk)
                what = (f"quantize {quant_name}: {samples} x {config.calib_tokens} calibration tokens"
                        f"{f', {chunk} samples per forward' if chunk else ''}")
            else:
                seconds, what = costs.get("quantize_uncalibrated"), f"quantize {quant_name}: no calibration"
            if config.backend:
                what = f"{what} (backend {config.backend})"
            plan.append(Step(spec.name, f"{what}; served on {kernel_label(config, device)}", seconds))
        for task_name in dict.fromkeys(c.task.name for c in own):
            task = matrix.tasks[task_name]
            task = dataclasses.replace(task, options={**task.options, **limits.get("options", {}).get(task_name, {})})
            kind = kind_of(task)
            items = limits.get(task_name)
            variants = 1 + len({c.quant_name for c in own if c.task.name == task_name})
            per_model = kind.seconds(task, items, costs) if items else None
            plan.append(Step(spec.name, f"evaluate {task_name}: {items} {kind.unit} x {variants} variants (baseline + "
                                        f"quantized), batch {task.get('batch_size', kind.default_batch_size)}",
                             None if per_model is None else variants * per_model))
            plan += [Step(spec.name, power_line(case, items, spreads.get(case.id)), 0.0, note=True)
                     for case in own if case.task.name == task_name and items]
        folder = baselines / hardware / profile
        state = "exists" if folder.exists() else "missing: snapshot tests fail until a run with --record-baselines records it"
        plan.append(Step(spec.name, f"compare {len(own)} cases with {folder} ({state})", 0.0))
    return plan


def render(plan: list[Step], header: str) -> str:
    lines = [header]
    for model in dict.fromkeys(step.model for step in plan):
        lines.append(f"\n{model}")
        for step in (s for s in plan if s.model == model):
            cost = "" if step.note else "not measured" if step.seconds is None else f"~{step.seconds / 60:.1f} min"
            lines.append(f"  {cost:>13}  {step.what}")
    known = sum(step.seconds for step in plan if step.seconds is not None)
    unknown = sum(step.seconds is None for step in plan)
    lines.append(f"\nestimated: {known / 60:.1f} min" + (f" plus {unknown} steps with no measured cost" if unknown else ""))
    return "\n".join(lines)


def describe(matrix: Matrix, cases: list[Case], profile: str, tier: str, baselines: Path,
             hardware: str | None = None, spreads: dict[str, float] | None = None) -> str:
    """The rendered plan of ``cases`` (one tier) on ``hardware``: by default this machine's, or h100 (the GPU with
    measured costs) for a GPU plan on a machine without CUDA, which the header then says."""
    cuda = torch.cuda.is_available()
    hardware = hardware or ("cpu" if tier == "cpu" else hardware_class("cuda") if cuda else "h100")
    header = f"plan: {len(cases)} {tier}-tier cases, profile {profile}, hardware {hardware}"
    if tier == "gpu" and not cuda:
        header += f"\nCUDA is not available on this machine: this is the plan for a GPU runner ({hardware}); nothing runs here"
    return render(steps(matrix, cases, profile, tier, "cuda" if tier == "gpu" else "cpu", hardware, baselines, spreads),
                  header)


def cached_spreads(workbench: Workbench, cases: list[Case]) -> dict[str, float]:
    """Each case's per-item spread of its headline retention, from its baseline's and candidate's results where both
    are in the cache (nothing is built or evaluated); none for a case whose inputs are not reachable from here."""
    spreads = {}
    for case in cases:
        try:
            cached = all(workbench.results.cached(case.model, case.task.name, q) for q in (None, case.quant_name))
        except (UserError, OSError):
            continue
        if cached:
            spread = workbench.compare(case).extra.get("spread")
            if spread is not None:
                spreads[case.id] = spread
    return spreads


def unreachable_inputs(cases: list[Case], data_dir: Path | None) -> list[str]:
    """What keeps these cases from reading their inputs, one line each (empty when all is reachable): the data files
    of the built-in tasks, an lm-eval task's data off the hub, and each model's weights."""
    problems = missing_files(sorted({case.task.loader for case in cases if case.task.kind != HARNESS}), data_dir)
    for task in {case.task.name: case.task for case in cases if case.task.kind == HARNESS}.values():
        problems += [problem for problem in [offline_problem(task)] if problem]
    for spec in dict.fromkeys(case.model for case in cases):
        reason = spec.unavailable_reason()
        if reason:
            problems.append(reason)
    return problems
