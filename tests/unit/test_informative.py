"""The informative rules (quant/informative.py): a baseline near chance, below BM25 or solving too little is
gated on its fallback signal, computed from both models' per-item columns as the gate hands them over."""
import pytest

from quant.informative import informativeness
from quant.kinds import TaskResult, kind_of
from quant.tasks import TaskSpec, load_tasks

TASKS = load_tasks()
GATE = {"chance_margin": 0.05, "correlation_min": 0.5, "min_correct": 3, "retention_min": 0.9}
CHOICE = {"prediction": 1, "label": 1, "correct": True, "logodds": 1.0, "logprobs": [-2.0, -1.0]}
RERANK = {"ranking": ["d1"], "ndcg": 0.8, "mrr": 1.0, "bm25_ndcg": 0.5, "bm25_mrr": 0.5}
GENERATE = ({"output": "#### 3", "target": "3", "answers": {"strict-match": "3", "flexible-extract": "3"},
             "prediction": "3", "correct": True},
            {"output": "3", "target": "3", "answers": {"strict-match": None, "flexible-extract": "3"},
             "prediction": None, "correct": False})


def _task_of(kind: str) -> TaskSpec:
    return next(task for task in TASKS.values() if task.kind == kind)


def test_a_kind_without_a_rule_is_always_informative():
    task = _task_of("perplexity")
    assert informativeness(task, GATE, "perplexity", {}, {}, {}).informative


def _result(task: TaskSpec, records: list[dict]) -> TaskResult:
    kind = kind_of(task)
    columns = kind.columns(records)
    return TaskResult(task.name, {m: float(kind.aggregate(m)(columns)) for m in kind.reported(task)}, records)


def _informativeness(task, base: list[dict], quant: list[dict], metric: str):
    """The kind's informative rule on two sets of records, given as the gate gives it: as columns."""
    kind = kind_of(task)
    return informativeness(task, GATE, metric, _result(task, base).metrics, kind.columns(base), kind.columns(quant))


def test_choice_near_chance_is_gated_on_the_score_correlation():
    task = _task_of("choice")
    labels = [1, 0, 1, 0]
    base = [{**CHOICE, "id": str(i), "label": y, "correct": i < 2, "logodds": float(i)}
            for i, y in enumerate(labels)]
    quant = [{**r, "logodds": -r["logodds"]} for r in base]
    decided = _informativeness(task, base, quant, "accuracy")
    assert not decided.informative  # 0.5 against chance 0.5 + margin
    assert decided.fallback == ("score correlation with the baseline", pytest.approx(-1.0), 0.5)
    assert decided.signals["chance"] == 0.5 and decided.signals["roc_auc_baseline"] is not None


def test_a_reranker_that_does_not_beat_bm25_is_gated_on_its_per_query_correlation():
    task = _task_of("rerank")
    base = [{**RERANK, "id": "q1", "ndcg": 0.4}, {**RERANK, "id": "q2", "ndcg": 0.5}]
    decided = _informativeness(task, base, base, "ndcg@10")
    assert not decided.informative and decided.signals["bm25"] == 0.5
    assert decided.fallback == ("per-query ndcg@10 correlation with the baseline", pytest.approx(1.0), 0.5)


def test_a_generator_that_solves_too_little_is_gated_on_keeping_the_answer_format():
    task = _task_of("generate")
    base = [{**GENERATE[0], "id": str(i)} for i in range(2)] + [{**GENERATE[1], "id": str(i)} for i in range(2, 10)]
    decided = _informativeness(task, base, base, "strict-match")
    assert not decided.informative  # 2 solved < min_correct 3
    assert decided.fallback[0] == "answer-format retention, 95% CI upper bound" and decided.fallback[1] == 1.0
    assert decided.signals["answered_baseline"] == decided.signals["answered_quantized"] == 0.2
