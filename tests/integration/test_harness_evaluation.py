"""lm-eval's evaluator run on a model (it starts a process of its own, git, for its log): a look asks for its own
documents only, and BoolQ through lm-eval predicts as the built-in BoolQ."""
import pytest

from quant.kinds import kind_of
from quant.kinds.harness import INSTALL
from quant.tasks import evaluate, read_task_file
from tests.helpers.harness import ENTRY, task_file

pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is not installed: {INSTALL}")
from lm_eval.api.model import LM  # noqa: E402


def test_a_look_evaluates_only_the_documents_of_its_span(tmp_path):
    """Items 7, 3, 4, 5, 6 of the task's ten documents (a look's items, in the evaluation order's shuffle): lm-eval is
    asked about those five alone (two choices each), and each record holds its own document's acc and answer."""
    task = read_task_file(task_file(tmp_path))["mine"]
    kind = kind_of(task)
    items = kind.load(task, None)
    assert [item["id"] for item in items] == [f"mine-{index}" for index in range(10)]
    lm = CountingLM()
    result = evaluate(lm, None, task, [items[7], *items[3:7]])
    assert len(lm.contexts) == 5 * 2
    assert {context.splitlines()[0] for context in lm.contexts} == {f"{index} is a number." for index in range(3, 8)}
    assert [record["id"] for record in result.items] == ["mine-7", "mine-3", "mine-4", "mine-5", "mine-6"]
    assert [record["answer"] for record in result.items] == [0, 0, 1, 0, 1]  # " yes" (1) on even documents
    assert [record["acc"] for record in result.items] == [1.0] * 5  # and their label is true
    assert result.metrics == {"acc": pytest.approx(1.0)}


def test_boolq_through_lm_evals_own_task_predicts_as_the_built_in_boolq(matrix, workbench, shared_data, tmp_path):
    """lm-eval's boolq definition on the shipped BoolQ file (its labels "true"/"false" mapped by an override) and
    the suite's built-in BoolQ evaluator, on the same 16 items of the baseline model: the same predictions."""
    spec = matrix.models["smollm2-135m"]
    path = tmp_path / "tasks.yaml"
    path.write_text(ENTRY.format(data=shared_data / "boolq" / "val.jsonl", metrics="acc").replace("mine:", "boolq_lm:"))
    harness_task = read_task_file(path)["boolq_lm"]
    ours = workbench.items(spec, "boolq")[:16]
    by_idx = {item["doc"]["idx"]: item for item in kind_of(harness_task).load(harness_task, None)}
    theirs = [by_idx[int(item["id"].removeprefix("boolq-"))] for item in ours]
    model, tokenizer = workbench.baseline(spec)
    built_in = evaluate(model, tokenizer, workbench.task(spec, "boolq"), ours)
    harness = evaluate(model, tokenizer, harness_task, theirs)
    assert [r["prediction"] for r in built_in.items] == [r["answer"] for r in harness.items]
    assert harness.metrics["acc"] == pytest.approx(built_in.metrics["accuracy"])


class CountingLM(LM):
    """Answers " yes" for a document whose number is even, " no" otherwise, and keeps every request's context."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[str] = []

    def loglikelihood(self, requests):
        self.contexts += [request.args[0] for request in requests]
        def even(context: str) -> bool:
            return int(context.split(" ", 1)[0]) % 2 == 0

        return [(-1.0 if (request.args[1] == " yes") == even(request.args[0]) else -2.0, False) for request in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError
