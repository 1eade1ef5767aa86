"""The regression matrix (``matrix.yaml``) expanded into cases with readable ids."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from quant import project
from quant.config import ConfigError, QuantConfig, check_profile, load_yaml
from quant.backends import get_backend
from quant.models import ModelSpec, parse_models
from quant.kinds import kind_of
from quant.kinds.base import COMMON_OPTIONS
from quant.kinds.perplexity import DIVERGENCE_METRICS
from quant.tasks import TaskSpec, load_tasks

# Each gate field's value where neither the matrix's defaults nor the case set it (the reference study's 4-bit
# claims; a matrix overrides any of them).
GATE_DEFAULTS = {"retention_min": 0.90, "ppl_ratio_max": 1.10, "chance_margin": 0.05, "min_correct": 5,
                 "correlation_min": 0.30, "strict": False, "kld_max": None, "same_top_min": None,
                 "snapshot_tolerance": {}, "detect": None, "spread_prior": {}, "sequential": True}
GATE_FIELDS = tuple(GATE_DEFAULTS)


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

    def check_profile(self, profile: str, option: str = "--profile") -> None:
        """Refuse a profile this matrix does not define, naming the option that chose it."""
        check_profile(self.profiles, profile, self.path, option)

    def check_names(self, model: str, quants: list[str]) -> None:
        """Refuse a model or quant config name this matrix does not define, naming it and listing the known ones."""
        if model not in self.models:
            raise ConfigError(f"unknown model {model!r} in {self.path}; known: {', '.join(sorted(self.models))}")
        unknown = [name for name in quants if name not in self.quant]
        if unknown:
            raise ConfigError(f"unknown quant config {', '.join(map(repr, unknown))} in {self.path}; known: "
                              f"{', '.join(sorted(self.quant))}")

    def case(self, case_id: str) -> Case:
        """The case with this id, or an error naming the closest ids."""
        cases = {case.id: case for case in self.cases}
        if case_id not in cases:
            close = [known for known in cases if case_id in known][:5]
            raise ConfigError(f"no case {case_id!r} in {self.path}" + (f"; did you mean {', '.join(close)}?" if close
                                                                       else f"; ids look like {self.cases[0].id}"))
        return cases[case_id]

    def resolved(self, case: Case, profile: str) -> dict[str, Any]:
        """The case as the suite runs it under ``profile``: the matrix's defaults, the case entry, its quant config,
        its task with the profile's options, the profile's item count and calibration, and the gate."""
        limits = self.limits(profile, case.model.tier)
        return {
            "case": case.id, "cadence": case.cadence, "expected_failure": case.expected_failure,
            "model": {k: v for k, v in dataclasses.asdict(case.model).items() if v is not None},
            "quant": {"name": case.quant_name, **case.quant.to_dict()},
            "task": {"name": case.task.name, "loader": case.task.loader, "kind": case.task.kind,
                     **case.task.options, **limits.get("options", {}).get(case.task.name, {})},
            "profile": {"name": profile, "items": limits.get(case.task.name),
                        **{k: limits[k] for k in ("calib_samples", "calib_chunk") if k in limits}},
            "gate": case.gate,
        }

    def selection(self, select: str | None, tier: str, cadence: str) -> tuple[list[Case], list[tuple[Case, str]]]:
        """The cases a run of ``tier`` and ``cadence`` runs (their id containing ``select``, when given), and each
        other selected case with why it is not run."""
        selected = [c for c in self.cases if not select or select in c.id]
        if not selected:
            raise ConfigError(f"-k {select!r} matches no case of {self.path}; case ids look like {self.cases[0].id}")
        cases = [c for c in selected if c.model.tier == tier and cadence in ("all", c.cadence)]
        skipped = [(c, f"tier {c.model.tier}: not run in this {tier} report") for c in selected if c.model.tier != tier]
        skipped += [(c, f"cadence {c.cadence}: not run in this report (--cadence {c.cadence} or all runs it)")
                    for c in selected if c.model.tier == tier and c not in cases]
        return cases, skipped

    def with_checkpoint(self, base: str, folder: Path, tasks: list[str] | None, like: str | None
                        ) -> tuple[Matrix, list[Case]]:
        """This matrix with a checkpoint folder as one more quant config, and the cases that judge it: the base
        model's tasks, each gated as this matrix gates ``like``'s case of that task (default: the base model's
        first case of the task)."""
        self.check_names(base, [like] if like else [])
        gates: dict[str, Case] = {}
        for case in self.cases:
            if case.model.name == base and (like is None or case.quant_name == like):
                gates.setdefault(case.task.name, case)
        unknown = sorted(set(tasks or []) - set(gates))
        if unknown or not gates:
            raise ConfigError(f"--tasks {', '.join(unknown) or '(none)'}: the matrix gates {base}"
                              f"{f' {like}' if like else ''} on {', '.join(sorted(gates)) or 'no task'}")
        name = f"checkpoint-{folder.name}"
        config = QuantConfig.from_dict({"checkpoint": str(folder.resolve())}, where="--candidate")
        cases = [dataclasses.replace(gates[task], quant_name=name, quant=config, cadence="default",
                                     expected_failure=None) for task in (tasks or gates)]
        return dataclasses.replace(self, quant={**self.quant, name: config}), cases


SCHEMA_FILE = Path(__file__).resolve().parent / "matrix.schema.json"


def _line_of(path: Path, where: list[Any]) -> int | None:
    """The line in ``path`` of the YAML node at ``where`` (keys and indices), or of its nearest ancestor found."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line = node.start_mark.line + 1 if node else None
    for step in where:
        if isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if key.value == step), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            node = node.value[step]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _dotted(where: list[Any]) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in where).lstrip(".") or "(top level)"


def _problem(error: jsonschema.ValidationError, path: Path) -> tuple[int | None, str]:
    """(line, "field.path: what is wrong") of one schema error; an unknown key is named at its own line."""
    where = list(error.absolute_path)
    message = error.message
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        # jsonschema names them in its message: "... not allowed ('a', 'b' were unexpected)"
        unknown = re.findall(r"'([^']+)'", message.partition("(")[2])
        if unknown:
            where.append(unknown[0])
            message = "unknown field" + (f" (and {', '.join(unknown[1:])})" if unknown[1:] else "")
    return _line_of(path, where), f"{_dotted(where)}: {message}"


def validate(raw: Any, path: Path, task_names: list[str]) -> None:
    """Check ``raw`` (the parsed ``path``) against matrix.schema.json, its tasks being ``task_names``: one
    ConfigError line naming the file, the line and the field of each problem, the most relevant first."""
    schema = json.loads(SCHEMA_FILE.read_text())
    schema["$defs"]["taskName"]["enum"] = task_names  # the tasks are the task files', not the schema's
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=jsonschema.exceptions.relevance)
    if not errors:
        return
    problems = [_problem(error, path) for error in errors]
    first_line, first = problems[0]
    rest = "; ".join(f"line {line}: {text}" if line else text for line, text in problems[1:3])
    more = f" (also {rest}{'; ...' if len(problems) > 3 else ''})" if rest else ""
    raise ConfigError(f"{path}{f':{first_line}' if first_line else ''}: {first}{more}; the fields are described "
                      f"in {SCHEMA_FILE}")


def task_files(raw: Any, path: Path) -> list[Path]:
    """The team's own task files or folders that the matrix at ``path`` names (``task_files``, relative to it)."""
    named = raw.get("task_files", []) if isinstance(raw, dict) else []
    if not isinstance(named, list) or not all(isinstance(name, str) for name in named):
        raise ConfigError(f"{path}:{_line_of(path, ['task_files'])}: task_files: a list of task files or folders")
    files = [path.parent / name for name in named]
    for number, file in enumerate(files):
        if not file.exists():
            raise ConfigError(f"{path}:{_line_of(path, ['task_files', number])}: task_files[{number}]: {file} "
                              "not found")
    return files


def _check_profile_options(profiles: dict[str, Any], tasks: dict[str, TaskSpec], path: Path) -> None:
    """Each task option a profile overrides is one its task's kind reads (a misspelt one would change nothing)."""
    for profile, tiers in profiles.items():
        for tier, limits in tiers.items():
            for task_name, options in limits.get("options", {}).items():
                where = ["profiles", profile, tier, "options", task_name]
                if task_name not in tasks:
                    raise ConfigError(f"{path}:{_line_of(path, where)}: {_dotted(where)}: no task {task_name!r}; "
                                      f"known: {sorted(tasks)}")
                kind = kind_of(tasks[task_name])
                readable = kind.options | COMMON_OPTIONS
                for field in sorted(set(options) - readable):
                    raise ConfigError(f"{path}:{_line_of(path, [*where, field])}: {_dotted([*where, field])}: task "
                                      f"{task_name!r} (kind {kind.name}) has no option {field!r}; it reads "
                                      f"{sorted(readable)}")


def _check_tolerances(raw: dict[str, Any], tasks: dict[str, TaskSpec], path: Path) -> None:
    """Each metric a snapshot tolerance names is one that a task of the matrix reports: a misspelt one would leave
    the metric it meant at its default tolerance. (Any task's: one anchored block of tolerances serves cases of
    several tasks.) A quantized result holds its kind's metrics, and the divergences from the baseline where the
    baseline runs beside the model."""
    known = set()
    for task in tasks.values():
        kind = kind_of(task)
        known |= set(kind.reported(task)) | (set(DIVERGENCE_METRICS) if kind.uses_reference else set())
    entries = [(["defaults"], raw.get("defaults", {}))]
    entries += [(["cases", number], entry) for number, entry in enumerate(raw.get("cases", []))]
    for where, entry in entries:
        for metric in entry.get("snapshot_tolerance", {}):
            if metric not in known:
                at = [*where, "snapshot_tolerance", metric]
                raise ConfigError(f"{path}:{_line_of(path, at)}: {_dotted(at)}: no task of the matrix reports a "
                                  f"metric {metric!r}; they report {sorted(known)}")


def load_matrix(path: Path | None = None) -> Matrix:
    """The matrix at ``path``, by default the working folder's project's (quant.project), checked against
    matrix.schema.json; its tasks are the built-in ones and those of the task files it names."""
    path = Path(path) if path else project.current().require_matrix()
    raw = load_yaml(path)
    tasks = load_tasks(task_files(raw, path))
    validate(raw, path, sorted(tasks))
    models = parse_models(raw.get("models", {}))
    quant = {name: QuantConfig.from_dict(entry, where=f"{path} quant.{name}") for name, entry in raw.get("quant", {}).items()}
    for name, config in quant.items():
        if not config.checkpoint:
            get_backend(config.backend, f"{path} quant.{name}").check(config, f"{path} quant.{name}")
    defaults = raw.get("defaults", {})
    measured = raw.get("measured_tolerances", {}).get("cases", {})  # by case id, over each case's own tolerances
    cases: dict[str, Case] = {}
    for number, entry in enumerate(raw.get("cases", [])):
        where = f"{path} cases[{number}]"
        gate = {**GATE_DEFAULTS, **defaults, **{k: v for k, v in entry.items() if k in GATE_FIELDS}}
        # a case's snapshot tolerances refine the defaults metric by metric
        gate["snapshot_tolerance"] = {**defaults.get("snapshot_tolerance", {}), **entry.get("snapshot_tolerance", {})}
        for model_name in entry["models"]:
            for quant_name in entry["quant"]:
                for task_name in entry["tasks"]:
                    for kind, name, known in (("model", model_name, models), ("quant", quant_name, quant),
                                              ("task", task_name, tasks)):
                        if name not in known:
                            raise ConfigError(f"{where}: unknown {kind} {name!r}; known: {sorted(known)}")
                    case_id = f"{model_name}-{quant_name}-{task_name}"
                    own_gate = gate if case_id not in measured else {
                        **gate, "snapshot_tolerance": {**gate["snapshot_tolerance"], **measured[case_id]}}
                    case = Case(models[model_name], quant_name, quant[quant_name], tasks[task_name],
                                entry.get("cadence", "default"), own_gate, entry.get("expected_failure"))
                    if case.id in cases:
                        raise ConfigError(f"{where}: case {case.id} is already defined by an earlier entry")
                    cases[case.id] = case
    _check_profile_options(raw.get("profiles", {}), tasks, path)
    _check_tolerances(raw, tasks, path)
    stale = sorted(set(measured) - set(cases))
    if stale:
        raise ConfigError(f"{path}: measured_tolerances.cases names no case of the matrix: {stale}; remove those "
                          "entries or rerun python -m quant noise --write")
    return Matrix(path, raw.get("seed", 0), raw.get("profiles", {}), models, quant, tasks, list(cases.values()),
                  raw.get("costs", {}))
