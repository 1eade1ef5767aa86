"""What every task kind is: a task's settings (``TaskSpec``, from tasks.yaml), its result (``TaskResult``: metrics and
per-item records) and the ``TaskKind`` interface a kind module implements. A kind owns everything that differs
between kinds: how items are chosen and scored, the per-item record, the metrics with their direction and
aggregation, and its cost in the plan. (When its baseline is informative is policy: ``quant.informative``.)"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from quant import data
from quant.config import TASKS_FILE, ConfigError

Columns = dict[str, np.ndarray]  # per-item numeric fields, items on the last axis
Aggregate = Callable[[Columns], np.ndarray]  # a metric from columns: over the last axis, so resamples batch
# Fields of every task whatever its kind: the batch, a filter on item ids, a team task's own JSONL (quant.tasks)
COMMON_OPTIONS = frozenset({"batch_size", "id_prefix", "data_files"})


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    loader: str
    kind: str
    options: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        try:
            return self.options[key]
        except KeyError:
            raise ConfigError(f"{TASKS_FILE}: task {self.name!r} needs the field {key!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclasses.dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    items: list[dict[str, Any]]  # the kind's records, as dicts (they are cached as JSON)

    @property
    def n(self) -> int:
        return len(self.items)


class TaskKind:
    """One way of scoring a task; each kind is one module under ``quant/kinds`` and one entry of ``KINDS``."""

    name: ClassVar[str]
    record: ClassVar[type]  # the per-item record's dataclass
    options: ClassVar[frozenset[str]]  # the tasks.yaml fields this kind reads (besides loader, kind, batch_size)
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    uses_reference: ClassVar[bool] = False  # the baseline runs beside the model (divergences)
    unit: ClassVar[str] = "items"
    default_batch_size: ClassVar[int] = 8

    def metrics(self, task: TaskSpec) -> list[str]:
        """The metrics the task is gated and reported on, the headline first (tasks.yaml ``metrics``)."""
        return list(task["metrics"])

    def known_metrics(self, task: TaskSpec) -> frozenset[str]:
        raise NotImplementedError

    def load(self, task: TaskSpec, data_dir: Path | None) -> list[dict]:
        """All the task's items: a team task's own JSONL (loader jsonl), else its loader's data."""
        if task.loader == data.FILE_LOADER:
            return data.load_jsonl(Path(task["data_files"]), task.name)
        return data.load(task.loader, data_dir)

    def select(self, task: TaskSpec, items: list[dict], limit: int | None, seed: int) -> list[dict]:
        """The deterministic evaluation subset of the task's items."""
        return data.subset(items, limit, seed)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, task: TaskSpec, items: list[dict],
                 span: range | None, label: str, reference_model: torch.nn.Module | None) -> TaskResult:
        """Score the items; ``span``: the positions of the task's evaluation order they are (only a kind whose items
        are cut from one text, ``span_items``, reads it)."""
        raise NotImplementedError

    def span_items(self, items: list[dict], span: range) -> list[dict]:
        """The items at ``span``'s positions of the evaluation order (``select``'s list, whose prefixes are the
        smaller subsets): a result is cached span by span, so that a longer run extends a shorter one."""
        return items[span.start : span.stop]

    def size(self, task: TaskSpec, items: list[dict], limit: int | None, tokenizer: Callable[[], Any]) -> int:
        """How many units (the positions a span counts) the profile evaluates: ``select`` has cut the items to
        ``limit``; ``tokenizer`` is called only by a kind that must tokenize to count."""
        return len(items)

    def evaluate_models(self, models: list[torch.nn.Module], tokenizer: Any, task: TaskSpec, items: list[dict],
                        span: range | None, label: str, reference_model: torch.nn.Module) -> list[TaskResult]:
        """For a kind that ``uses_reference``: each model's result beside one run of the reference, whose own
        result comes last (what each model gets alone, for less than a reference run per model)."""
        raise NotImplementedError

    def columns(self, records: list[dict]) -> Columns:
        """The records' numeric scalar fields as columns."""
        keys = [k for k, v in records[0].items() if isinstance(v, (bool, int, float))]
        return {k: np.array([record[k] for record in records], dtype=float) for k in keys}

    def aggregate(self, metric: str) -> Aggregate:
        """How ``metric`` is computed from the records' columns: the evaluation's figure and every bootstrap
        resample's come from this one definition."""
        raise NotImplementedError

    def result(self, task: TaskSpec, records: list[Any]) -> TaskResult:
        """The task's result from its records."""
        return self.summarize(task, [dataclasses.asdict(record) for record in records])

    def summarize(self, task: TaskSpec, items: list[dict[str, Any]]) -> TaskResult:
        """The task's result from its records as dicts (fresh, or cached span by span): every reported metric by
        its aggregate."""
        columns = self.columns(items)
        return TaskResult(task.name, {m: float(self.aggregate(m)(columns)) for m in self.reported(task)}, items)

    def reported(self, task: TaskSpec) -> list[str]:
        """Every metric the result holds: the gated ones and any reference figures."""
        return self.metrics(task)

    def answer(self, record: dict) -> Any:
        """What two models agree on when they give the same answer (None: the kind has no answer)."""
        return None

    def forwards_per_item(self, task: TaskSpec) -> int:
        """Forward passes of up to 512 tokens per item, for the plan's cost."""
        return 1

    def seconds(self, task: TaskSpec, items: int, costs: dict[str, Any]) -> float | None:
        """The plan's estimate for one model on ``items`` items from the measured ``costs`` (None: not measured)."""
        if "forward_512" not in costs:
            return None
        return items * self.forwards_per_item(task) * costs["forward_512"]

    def check(self, task: TaskSpec, where: str) -> None:
        """A ConfigError naming ``where`` when the task has a field this kind does not read or an unknown metric."""
        unread = sorted(set(task.options) - self.options - COMMON_OPTIONS)
        if unread:
            raise ConfigError(f"{where}: task {task.name!r} (kind {self.name}) has fields it does not read: {unread}; "
                              f"it reads {sorted(self.options | COMMON_OPTIONS)}")
        unknown = [m for m in self.metrics(task) if m not in self.known_metrics(task)]
        if unknown:
            raise ConfigError(f"{where}: task {task.name!r} (kind {self.name}) has no metric {unknown[0]!r}; "
                              f"known: {sorted(self.known_metrics(task))}")
