"""Any lm-evaluation-harness task as a task of the matrix (the optional ``lm-eval`` extra). A task entry names
lm-eval's task (``lm_eval: arc_easy``), or one of a team's own task YAMLs through ``include_path``; lm-eval's own
definition (prompt, few-shot, scorer) is used, its data optionally replaced by local ``data_files`` so that a
runner without the hub can run it. lm-eval's evaluator runs on the model the suite built, on its device, for the
documents of the span asked for (``samples``), and its per-document log (``log_samples``) becomes the suite's
per-item records: the paired gate, flips, looks, snapshots and the report read them like any kind's. A gated metric
is one lm-eval averages over documents; its direction is lm-eval's ``higher_is_better``."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quant.config import ConfigError
from quant.kinds.base import Aggregate, TaskKind, TaskResult, TaskSpec

INSTALL = 'pip install "quant-suite[lm-eval]"'
CLOSEST = 5  # names suggested for an unknown task


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as error:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness ({error}); install it with: {INSTALL}") from None
    return lm_eval


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None) -> Any:
    """lm-eval's index of its task YAMLs (and a team's folder): built once per process, it scans thousands."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_config(task: TaskSpec) -> dict[str, Any]:
    """lm-eval's config of the task's ``lm_eval`` name, with the entry's ``data_files`` and ``overrides`` applied;
    an unknown name is a ConfigError listing the closest ones."""
    import difflib

    from lm_eval.tasks._yaml_loader import load_yaml

    name, manager = task["lm_eval"], task_manager(task.get("include_path"))
    if name not in manager.task_index:
        closest = difflib.get_close_matches(name, list(manager.task_index), n=CLOSEST)
        raise ConfigError(f"task {task.name!r}: lm-eval has no task {name!r}; closest: {', '.join(closest) or 'none'}")
    entry = manager.task_index[name]
    if entry.yaml_path is None:
        raise ConfigError(f"task {task.name!r}: lm-eval's {name!r} is defined in Python, not YAML; the suite reads "
                          "YAML task definitions")
    config = load_yaml(entry.yaml_path)
    config.pop("tag", None)
    files = task.get("data_files")
    if files is not None:
        files = {"test": files} if isinstance(files, str) else dict(files)
        config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
                      test_split="test", validation_split=None, training_split=None,
                      fewshot_split="train" if "train" in files else None)
    config.update(task.get("overrides", {}))
    return config


def build_task(task: TaskSpec, config: dict[str, Any] | None = None) -> Any:
    """lm-eval's task object from ``config`` (default: ``task_config(task)``), its documents loaded (from data_files,
    or the hub: a ConfigError when unreachable)."""
    require_lm_eval()
    from lm_eval.api.task import ConfigurableTask

    config = config if config is not None else task_config(task)
    try:
        return ConfigurableTask(config=config)
    except Exception as error:  # datasets raises many kinds when the hub is unreachable or a file is unreadable
        raise ConfigError(f"task {task.name!r}: lm-eval's {task['lm_eval']} cannot read its data "
                          f"({config.get('dataset_path')} {config.get('dataset_kwargs') or ''}): "
                          f"{type(error).__name__}: {str(error)[:200]}; offline, give data_files") from None


def offline_problem(task: TaskSpec) -> str | None:
    """One line when the lm-eval task reads its data from the hub (no data_files), which an offline runner cannot
    reach; None when it reads local files."""
    if task.get("data_files") is not None:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    return (f"task {task.name}: lm-eval's {task['lm_eval']} reads {task_config(task).get('dataset_path')} from the hub"
            + (", which HF_HUB_OFFLINE=1 forbids" if offline else "") + "; give data_files to run it offline")


def _named(value: Any) -> str:
    """A config value JSON cannot hold, as a stable string: a function (lm-eval's ``!function``) by its name."""
    return f"{value.__module__}.{value.__qualname__}" if callable(value) else str(value)


class Harness(TaskKind):
    name = "lm_eval"
    options = frozenset({"lm_eval", "include_path", "metrics", "num_fewshot", "filter", "apply_chat_template",
                         "gen_kwargs", "overrides"})
    default_batch_size = 8

    def __init__(self) -> None:
        self.directions: dict[str, bool] = {}  # metric -> higher is better, as lm-eval registers it

    @property
    def lower_is_better(self) -> frozenset[str]:
        return frozenset(metric for metric, higher in self.directions.items() if not higher)

    def known_metrics(self, task: TaskSpec) -> frozenset[str]:
        return frozenset(self.directions)

    def check(self, task: TaskSpec, where: str) -> None:
        """Also: lm-eval installed, and each metric one it averages over documents, with a registered direction."""
        require_lm_eval()
        import lm_eval.api.metrics  # noqa: F401  (registers the metrics)
        from lm_eval.api.registry import get_metric_aggregation, is_higher_better

        for metric in task["metrics"]:
            aggregation, higher = get_metric_aggregation(metric), is_higher_better(metric)
            if aggregation is None or aggregation.__name__ != "mean" or higher is None:
                raise ConfigError(f"{where}: task {task.name!r}: metric {metric!r} is not one lm-eval averages over "
                                  "documents with a registered direction (acc, acc_norm, exact_match, ...): the suite "
                                  "gates per-document means")
            self.directions[metric] = higher
        super().check(task, where)

    def load(self, task: TaskSpec, data_dir: Path | None) -> list[dict]:
        """One item per lm-eval evaluation document: its index there, its content, and a hash of lm-eval's version
        and of the task's definition as lm-eval reads it (prompt templates, scorer), since items are in the cache
        key of a result and the definition lives in lm-eval, not in the task entry."""
        import importlib.metadata

        config = task_config(task)
        definition = {"lm_eval": importlib.metadata.version("lm_eval"), "config": config}
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True, default=_named).encode()).hexdigest()[:16]
        docs = build_task(task, config).eval_docs
        return [{"id": f"{task.name}-{index}", "doc_index": index, "definition": digest,
                 "doc": json.loads(json.dumps(doc, default=str))} for index, doc in enumerate(docs)]

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, task: TaskSpec, items: list[dict],
                 span: range | None, label: str, reference_model: torch.nn.Module | None) -> TaskResult:
        samples = self.samples(task, model, tokenizer, [item["doc_index"] for item in items])
        return self.summarize(task, [self.record(task, item, samples[item["doc_index"]]) for item in items])

    def samples(self, task: TaskSpec, model: Any, tokenizer: Any, doc_indices: list[int]) -> dict[int, dict]:
        """lm-eval's per-document log for ``doc_indices`` alone, one filter's (``filter``, else its first)."""
        lm_eval = require_lm_eval()
        from lm_eval.api.model import LM
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        harness_task, ordered = build_task(task), sorted(set(doc_indices))
        lm = model if isinstance(model, LM) else HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=task.get("batch_size", self.default_batch_size))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # No seeds: lm-eval would reseed the global RNGs, a side effect on the caller. The task is passed built, so
        # the manager need not scan lm-eval's index.
        output = lm_eval.simple_evaluate(
            model=lm, tasks=[harness_task], samples={harness_task.config.task: ordered}, log_samples=True,
            bootstrap_iters=0, num_fewshot=task.get("num_fewshot"), gen_kwargs=task.get("gen_kwargs"),
            apply_chat_template=task.get("apply_chat_template", False),
            task_manager=TaskManager(include_defaults=False), random_seed=None, numpy_random_seed=None,
            torch_random_seed=None, fewshot_random_seed=None)
        logged = output["samples"][harness_task.config.task]
        chosen = task.get("filter") or logged[0]["filter"]
        # Sorted above: lm-eval walks the selected documents in their order in the task and logs the k-th as the k-th
        # index of the list it was given (evaluator.evaluate, doc_id_true), so an unsorted list mislabels them.
        by_doc = {sample["doc_id"]: sample for sample in logged if sample["filter"] == chosen}
        if set(doc_indices) - set(by_doc):
            raise ConfigError(f"task {task.name!r}: lm-eval logged no filter {chosen!r} for every document; "
                              f"its filters: {sorted({s['filter'] for s in logged})}")
        return by_doc

    def record(self, task: TaskSpec, item: dict, sample: dict) -> dict[str, Any]:
        """The item's record: each metric's value for the document and the model's answer (for flips)."""
        responses = sample["filtered_resps"]
        if responses and isinstance(responses[0], (list, tuple)):  # log-likelihoods of each choice
            answer: Any = int(np.argmax([float(response[0]) for response in responses]))
        else:
            answer = str(responses[0]) if responses else None
        return {"id": item["id"], "doc_index": item["doc_index"], "answer": answer,
                **{metric: float(sample[metric]) for metric in task["metrics"]}}

    def columns(self, records: list[dict]) -> dict[str, np.ndarray]:
        keys = [key for key in records[0] if key not in ("id", "doc_index", "answer")]
        return {key: np.array([record[key] for record in records], dtype=float) for key in keys}

    def aggregate(self, metric: str) -> Aggregate:
        return lambda columns: columns[metric].mean(axis=-1)

    def answer(self, record: dict) -> Any:
        return record["answer"]


KIND = Harness()
