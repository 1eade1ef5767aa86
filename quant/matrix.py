"""The regression matrix (``matrix.yaml``) expanded into cases with readable ids."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from quant.config import ConfigError, QuantConfig, load_yaml, matrix_path
from quant.backends import get_backend
from quant.models import ModelSpec, parse_models
from quant.tasks import TaskSpec, load_tasks

GATE_FIELDS = ("retention_min", "ppl_ratio_max", "chance_margin", "min_correct", "correlation_min", "strict",
               "kld_max", "same_top_min", "snapshot_tolerance")


@dataclasses.dataclass(frozen=True)
class Case:
    """One quantize-then-evaluate regression case: model x quantization config x task, with its gate."""

    model: ModelSpec
    quant_name: str
    quant: QuantConfig
    task: TaskSpec
    cadence: str
    gate: dict[str, Any]
    expected_failure: str | None = None  # a measured, known regression: the case must keep failing

    @property
    def id(self) -> str:
        return f"{self.model.name}-{self.quant_name}-{self.task.name}"


@dataclasses.dataclass
class Matrix:
    path: Path
    seed: int
    profiles: dict[str, dict[str, dict[str, int]]]
    models: dict[str, ModelSpec]
    quant: dict[str, QuantConfig]
    tasks: dict[str, TaskSpec]
    cases: list[Case]
    costs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # hardware -> measured costs (plan)

    def limits(self, profile: str, tier: str) -> dict[str, int]:
        try:
            return self.profiles[profile][tier]
        except KeyError:
            raise ConfigError(f"{self.path}: no profiles.{profile}.{tier}; known profiles: {sorted(self.profiles)}") from None


def load_matrix(path: Path | None = None) -> Matrix:
    """The matrix at ``path``, by default the one ``matrix_path`` names."""
    path = matrix_path(path)
    raw = load_yaml(path)
    models = parse_models(raw.get("models", {}))
    quant = {name: QuantConfig.from_dict(entry, where=f"{path} quant.{name}") for name, entry in raw.get("quant", {}).items()}
    for name, config in quant.items():
        if not config.checkpoint:
            get_backend(config.backend, f"{path} quant.{name}").check(config, f"{path} quant.{name}")
    tasks = load_tasks()
    defaults = raw.get("defaults", {})
    cases: dict[str, Case] = {}
    for number, entry in enumerate(raw.get("cases", []), start=1):
        where = f"{path} cases[{number}]"
        unknown = set(entry) - {"models", "quant", "tasks", "cadence", "expected_failure", *GATE_FIELDS}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        gate = {**defaults, **{k: v for k, v in entry.items() if k in GATE_FIELDS}}
        # a case's snapshot tolerances refine the defaults metric by metric
        gate["snapshot_tolerance"] = {**defaults.get("snapshot_tolerance", {}), **entry.get("snapshot_tolerance", {})}
        for model_name in entry["models"]:
            for quant_name in entry["quant"]:
                for task_name in entry["tasks"]:
                    for kind, name, known in (("model", model_name, models), ("quant", quant_name, quant),
                                              ("task", task_name, tasks)):
                        if name not in known:
                            raise ConfigError(f"{where}: unknown {kind} {name!r}; known: {sorted(known)}")
                    case = Case(models[model_name], quant_name, quant[quant_name], tasks[task_name],
                                entry.get("cadence", "default"), gate, entry.get("expected_failure"))
                    if case.id in cases:
                        raise ConfigError(f"{where}: case {case.id} is already defined by an earlier entry")
                    cases[case.id] = case
    return Matrix(path, raw.get("seed", 0), raw.get("profiles", {}), models, quant, tasks, list(cases.values()),
                  raw.get("costs", {}))
