"""Task kinds: each one module with one ``TaskKind`` (how a task of its shape is scored, what its records hold,
its metrics, its cost in the plan; when its baseline is informative is the gate's policy, quant.informative). A task in tasks.yaml names its kind; a new
kind is one module here and its entry in ``KINDS``."""
from __future__ import annotations

from quant.kinds import choice, generate, harness, perplexity, rerank
from quant.kinds.base import TaskKind, TaskResult, TaskSpec

KINDS: dict[str, TaskKind] = {module.KIND.name: module.KIND for module in (choice, generate, rerank, perplexity, harness)}


def kind_of(task: TaskSpec) -> TaskKind:
    return KINDS[task.kind]


def lower_is_better(metric: str) -> bool:
    """Whether ``metric`` (any kind's) is better lower: perplexity and the divergences."""
    return any(metric in kind.lower_is_better for kind in KINDS.values())


__all__ = ["KINDS", "TaskKind", "TaskResult", "TaskSpec", "kind_of", "lower_is_better"]
