"""Tasks as data: ``tasks.yaml`` names each task's loader, its kind (``quant/kinds``) and the kind's fields. This
module reads it, chooses a task's items and hands them to the task's kind to score."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from quant import data
from quant.config import TASKS_FILE, ConfigError, load_yaml
from quant.kinds import KINDS, TaskResult, TaskSpec, kind_of

HARNESS = "lm_eval"  # kind and loader of an lm-eval task (quant/kinds/harness.py)

__all__ = ["TaskResult", "TaskSpec", "evaluate", "load_tasks", "select_items"]


def load_tasks(paths: Sequence[Path] = ()) -> dict[str, TaskSpec]:
    """The built-in tasks (``tasks.yaml``) and those of a team's own task files, or folders of them (each
    ``*.yaml`` inside): every task is checked by its kind, and a name is defined once."""
    tasks, defined_in = {}, {}
    files = [TASKS_FILE] + [file for path in paths for file in (sorted(Path(path).glob("*.yaml")) if Path(path).is_dir()
                                                              else [Path(path)])]
    for file in files:
        for name, task in read_task_file(file).items():
            if name in tasks:
                raise ConfigError(f"{file}: task {name!r} is already defined in {defined_in[name]}; rename it")
            tasks[name], defined_in[name] = task, file
    return tasks


def read_task_file(path: Path) -> dict[str, TaskSpec]:
    """The tasks of one task file, each checked; a ConfigError names the file, the task and the field."""
    tasks = {}
    for name, entry in load_yaml(path).items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: task {name!r} must be a mapping of fields (loader, kind, ...)")
        entry = dict(entry)
        if "lm_eval" in entry:  # lm-eval's task: its own definition and data (quant/kinds/harness.py)
            entry.setdefault("kind", HARNESS)
            entry.setdefault("loader", HARNESS)
            for field in ("include_path", "data_files"):
                if field in entry:
                    entry[field] = _relative_to(path, entry[field], f"{path}: task {name!r}: {field}")
        try:
            kind, loader = entry.pop("kind"), entry.pop("loader")
        except KeyError as error:
            raise ConfigError(f"{path}: task {name!r} needs the field {error.args[0]!r}") from None
        if kind not in KINDS:
            raise ConfigError(f"{path}: task {name!r} has kind {kind!r}; known: {sorted(KINDS)}")
        if loader == data.FILE_LOADER:
            if not isinstance(entry.get("data_files"), str):
                raise ConfigError(f"{path}: task {name!r} (loader {loader}) needs data_files: the JSONL of its items, "
                                  "relative to this file")
            entry["data_files"] = str((path.parent / entry["data_files"]).resolve())
            if not Path(entry["data_files"]).is_file():
                raise ConfigError(f"{path}: task {name!r}: data_files {entry['data_files']} not found")
        elif (loader == HARNESS) != (kind == HARNESS):
            raise ConfigError(f"{path}: task {name!r}: an lm-eval task is written as lm_eval: <its name>, "
                              f"with neither kind nor loader (here kind {kind!r}, loader {loader!r})")
        elif loader not in data.LOADERS and loader != HARNESS:
            raise ConfigError(f"{path}: task {name!r} has loader {loader!r}; known: "
                              f"{sorted([*data.LOADERS, data.FILE_LOADER])}")
        tasks[name] = TaskSpec(name, loader, kind, entry)
        KINDS[kind].check(tasks[name], str(path))
    return tasks


def _relative_to(task_file: Path, value: object, where: str) -> object:
    """A path (or a mapping of split -> path) of a task entry, resolved from its task file's folder; each must exist."""
    if isinstance(value, dict):
        return {key: _relative_to(task_file, path, f"{where}.{key}") for key, path in value.items()}
    if not isinstance(value, str):
        raise ConfigError(f"{where}: a path, or a mapping of split to path")
    resolved = (task_file.parent / value).resolve()
    if not resolved.exists():
        raise ConfigError(f"{where}: {resolved} not found")
    return str(resolved)


def select_items(task: TaskSpec, data_dir: Path | None, limit: int | None, seed: int) -> list[dict]:
    """The task's deterministic evaluation subset (its kind decides: few-shot exemplars excluded, or one text)."""
    items = kind_of(task).load(task, data_dir)
    if task.get("id_prefix"):  # e.g. MS MARCO's TREC DL 2019 queries alone: "dl19-"
        items = [item for item in items if item["id"].startswith(task["id_prefix"])]
        if not items:
            raise ConfigError(f"task {task.name!r}: no item id starts with id_prefix {task['id_prefix']!r}")
    return kind_of(task).select(task, items, limit, seed)


def evaluate(model: torch.nn.Module, tokenizer, task: TaskSpec, items: list[dict], span: range | None = None,
             label: str = "", reference_model: torch.nn.Module | None = None) -> TaskResult:
    """Score the task's items at ``span``'s positions (None: all) with the task's kind; ``label`` names the run in
    the progress bar. Kinds that compare distributions (``uses_reference``) run ``reference_model`` (the baseline)
    beside the model."""
    kind = kind_of(task)
    chosen = kind.span_items(items, span) if span is not None else items
    return kind.evaluate(model, tokenizer, task, chosen, span, label or task.name,
                         reference_model if kind.uses_reference else None)
