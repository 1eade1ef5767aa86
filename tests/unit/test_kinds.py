"""Task kinds (quant/kinds/), each checked by the same contract from ``KINDS``: tasks.yaml's fields are the ones
the kind reads, its metrics are the ones it can compute, and every metric comes from its own per-item column."""
import dataclasses
import math

import pytest

from quant.config import TASKS_FILE, ConfigError
from quant.kinds import KINDS, kind_of, lower_is_better
from quant.tasks import TaskSpec, load_tasks, read_task_file, select_items

TASKS = load_tasks()


# An lm-eval task has no built-in entry (a matrix names one through its task_files): the contract's sample of it.
LM_EVAL_TASK = TaskSpec("arc", "lm_eval", "lm_eval", {"lm_eval": "arc_easy", "metrics": ["acc"]})


def _task_of(kind: str) -> TaskSpec:
    return next((task for task in TASKS.values() if task.kind == kind), LM_EVAL_TASK)


def test_every_kind_has_a_task_and_every_task_a_known_kind():
    assert {task.kind for task in TASKS.values()} | {LM_EVAL_TASK.kind} == set(KINDS)
    assert {task.kind for task in TASKS.values()} <= set(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_field_the_kind_does_not_read_is_an_error_naming_the_file(kind, tmp_path):
    task = _task_of(kind)
    kind_of(task).check(task, str(TASKS_FILE))  # the shipped entry is clean
    unread = rf"tasks.yaml: task '{task.name}' \(kind {kind}\) has fields it does not read: \['metric'\]"
    with pytest.raises(ConfigError, match=unread):
        kind_of(task).check(dataclasses.replace(task, options={**task.options, "metric": "accuracy"}), str(TASKS_FILE))


# generate's metrics are its extractions; lm_eval's are lm-eval's registry's (tests/unit/test_harness.py)
@pytest.mark.parametrize("kind", sorted(k for k in KINDS if k not in ("generate", "lm_eval")))
def test_an_unknown_metric_is_an_error_listing_the_known_ones(kind):
    task = dataclasses.replace(_task_of(kind), options={**_task_of(kind).options, "metrics": ["f1"]})
    with pytest.raises(ConfigError, match="has no metric 'f1'; known:"):
        kind_of(task).check(task, "tasks.yaml")


def test_load_tasks_names_the_file_for_an_unknown_kind_or_loader(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("t:\n  loader: boolq\n  kind: ranking\n")
    with pytest.raises(ConfigError, match=f"{path}: task 't' has kind 'ranking'"):
        read_task_file(path)
    path.write_text("t:\n  loader: squad\n  kind: choice\n")
    with pytest.raises(ConfigError, match=f"{path}: task 't' has loader 'squad'"):
        read_task_file(path)


# Two records per kind, the second worse: (records baseline, records candidate, metric, retention by hand)
CHOICE = ({"id": "a", "prediction": 1, "label": 1, "correct": True, "logodds": 1.0, "logprobs": [-2.0, -1.0]},
          {"id": "a", "prediction": 0, "label": 1, "correct": False, "logodds": -1.0, "logprobs": [-1.0, -2.0]})
RERANK = ({"id": "q", "ranking": ["d1"], "ndcg": 0.8, "mrr": 1.0, "bm25_ndcg": 0.5, "bm25_mrr": 0.5},
          {"id": "q", "ranking": ["d2"], "ndcg": 0.6, "mrr": 0.25, "bm25_ndcg": 0.5, "bm25_mrr": 0.5})
GENERATE = ({"id": "g", "output": "#### 3", "target": "3", "answers": {"strict-match": "3", "flexible-extract": "3"},
             "prediction": "3", "correct": True},
            {"id": "g", "output": "3", "target": "3", "answers": {"strict-match": None, "flexible-extract": "3"},
             "prediction": None, "correct": False})
WINDOW = ({"id": "window-0", "nll": 20.0, "tokens": 10}, {"id": "window-0", "nll": 25.0, "tokens": 10})
HARNESS = ({"id": "arc-0", "doc_index": 0, "answer": 2, "acc": 1.0}, {"id": "arc-0", "doc_index": 0, "answer": 1, "acc": 0.0})


@pytest.mark.parametrize("kind,records,metric,expected", [
    ("choice", CHOICE, "accuracy", 0.0),
    ("rerank", RERANK, "ndcg@10", 0.75),
    ("rerank", RERANK, "mrr@10", 0.25),
    ("rerank", RERANK, "bm25_ndcg@10", 1.0),
    ("generate", GENERATE, "strict-match", 0.0),
    ("generate", GENERATE, "flexible-extract", 1.0),
    ("generate", GENERATE, "answered", 0.0),
    ("perplexity", WINDOW, "perplexity", 20.0 / 25.0),
    ("lm_eval", HARNESS, "acc", 0.0),  # exp(2.0) / exp(2.5) on the inverted scale
])
def test_each_metric_is_aggregated_from_its_own_per_item_column(kind, records, metric, expected):
    """One item per model: the metric's value from the kind's aggregate over its own column. Perplexity's retention
    is baseline / candidate (lower is better); the others candidate / baseline."""
    aggregate = KINDS[kind].aggregate(metric)
    base, quant = (float(aggregate(KINDS[kind].columns([r]))) for r in records)
    if lower_is_better(metric):
        assert base / quant == pytest.approx(math.exp(2.0) / math.exp(2.5))
    else:
        assert (quant / base if base else 0.0) == pytest.approx(expected)


def test_a_result_holds_every_reported_metric_from_its_records():
    task = _task_of("rerank")
    kind = kind_of(task)
    result = kind.result(task, [kind.record(**RERANK[0]), kind.record(**RERANK[1])])
    assert result.metrics == pytest.approx({"ndcg@10": 0.7, "mrr@10": 0.625, "bm25_ndcg@10": 0.5, "bm25_mrr@10": 0.5})
    assert result.items == list(RERANK)


def test_a_task_file_reads_its_own_jsonl_and_names_what_is_missing(tmp_path):
    """A team's task (loader jsonl): items from the JSONL beside its file, ids its own or <task>-<line>; a task
    without data_files, or whose file is missing, is one error naming the task file."""
    (tmp_path / "items.jsonl").write_text('{"id": "a", "text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    entry = ('  kind: choice\n  prompt: "{text}"\n  choices: [" no", " yes"]\n  label_field: label\n'
             '  metrics: [accuracy]\n')
    path = tmp_path / "tasks.yaml"
    path.write_text(f"mine:\n  loader: jsonl\n  data_files: items.jsonl\n{entry}")
    task = read_task_file(path)["mine"]
    assert [item["id"] for item in select_items(task, None, None, 0)] in (["a", "mine-2"], ["mine-2", "a"])
    path.write_text(f"mine:\n  loader: jsonl\n{entry}")
    with pytest.raises(ConfigError, match=f"{path}: task 'mine' \\(loader jsonl\\) needs data_files"):
        read_task_file(path)
    path.write_text(f"mine:\n  loader: jsonl\n  data_files: gone.jsonl\n{entry}")
    with pytest.raises(ConfigError, match=f"{path}: task 'mine': data_files .*gone.jsonl not found"):
        read_task_file(path)
    (tmp_path / "boolq.yaml").write_text(f"boolq:\n  loader: jsonl\n  data_files: items.jsonl\n{entry}")
    with pytest.raises(ConfigError, match="boolq.yaml: task 'boolq' is already defined in .*quant/tasks.yaml"):
        load_tasks([tmp_path / "boolq.yaml"])
