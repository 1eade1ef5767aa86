"""lm-evaluation-harness tasks as matrix tasks (quant/kinds/harness.py): lm-eval's own definition on local data,
only the documents asked for evaluated, metrics and their direction from lm-eval's registry, and errors that name
the task."""
import json
import re

import pytest
import yaml

from quant.config import ConfigError
from quant.kinds import kind_of, lower_is_better
from quant.kinds.harness import INSTALL, offline_problem
from quant.tasks import evaluate, read_task_file
from tests.repo import MATRIX_FILE

pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is not installed: {INSTALL}")
from lm_eval.api.model import LM  # noqa: E402

ENTRY = """\
mine:
  lm_eval: boolq
  data_files: {data}
  overrides: {{doc_to_target: "{{{{ 1 if label == 'true' else 0 }}}}"}}
  metrics: [{metrics}]
"""


def _task_file(tmp_path, rows: int = 10, metrics: str = "acc", data: str = "items.jsonl"):
    with (tmp_path / "items.jsonl").open("w") as out:
        for index in range(rows):
            out.write(json.dumps({"idx": index, "question": f"is {index} even", "passage": f"{index} is a number.",
                                  "label": "true" if index % 2 == 0 else "false"}) + "\n")
    path = tmp_path / "tasks.yaml"
    path.write_text(ENTRY.format(data=data, metrics=metrics))
    return path


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


def test_a_look_evaluates_only_the_documents_of_its_span(tmp_path):
    """Items 7, 3, 4, 5, 6 of the task's ten documents (a look's items, in the evaluation order's shuffle): lm-eval is
    asked about those five alone (two choices each), and each record holds its own document's acc and answer."""
    task = read_task_file(_task_file(tmp_path))["mine"]
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


def test_the_direction_and_the_aggregation_are_lm_evals(tmp_path):
    read_task_file(_task_file(tmp_path))
    assert not lower_is_better("acc")
    with pytest.raises(ConfigError, match="metric 'word_perplexity' is not one lm-eval averages over documents"):
        read_task_file(_task_file(tmp_path, metrics="word_perplexity"))


def test_an_unknown_task_names_the_closest_and_hub_data_is_named_offline(tmp_path, monkeypatch):
    path = _task_file(tmp_path)
    path.write_text(path.read_text().replace("lm_eval: boolq", "lm_eval: boolqq"))
    task = read_task_file(path)["mine"]
    with pytest.raises(ConfigError, match="task 'mine': lm-eval has no task 'boolqq'; closest: boolq"):
        kind_of(task).load(task, None)
    path.write_text("arc:\n  lm_eval: arc_easy\n  metrics: [acc]\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline_problem(read_task_file(path)["arc"]) == (
        "task arc: lm-eval's arc_easy reads allenai/ai2_arc from the hub, which HF_HUB_OFFLINE=1 forbids; give "
        "data_files to run it offline")
    with pytest.raises(ConfigError, match=r"task 'mine': data_files: .*gone.jsonl not found"):
        read_task_file(_task_file(tmp_path, data="gone.jsonl"))


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


def test_a_gpu_case_on_a_hub_task_is_planned_and_its_data_named_offline(tmp_path, capsys, monkeypatch):
    """A team's GPU case on lm-eval's ARC-Easy (its data on the hub): costed in the GPU plan from the matrix's
    measured costs, and named in one line by the dry run offline."""
    from quant.cli import main

    raw = yaml.safe_load(MATRIX_FILE.read_text())
    (tmp_path / "tasks.yaml").write_text("arc_easy:\n  lm_eval: arc_easy\n  metrics: [acc_norm]\n  batch_size: 32\n")
    matrix = {"seed": 1, "task_files": ["tasks.yaml"], "costs": raw["costs"],
              "profiles": {"test": {"gpu": {"arc_easy": 500, "calib_samples": 64}}},
              "models": {"llama-3.2-1b": raw["models"]["llama-3.2-1b"]},
              "quant": {"gptq-w4g128": raw["quant"]["gptq-w4g128"]},
              "cases": [{"models": ["llama-3.2-1b"], "quant": ["gptq-w4g128"], "tasks": ["arc_easy"]}]}
    (tmp_path / "quant.yaml").write_text(yaml.safe_dump(matrix))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["report", "--matrix", str(tmp_path / "quant.yaml"), "--tier", "gpu", "--profile", "test",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"~\d+\.\d min  evaluate arc_easy: 500 items x 2 variants \(baseline \+ quantized\), batch 32", out)
    assert ("task arc_easy: lm-eval's arc_easy reads allenai/ai2_arc from the hub, which HF_HUB_OFFLINE=1 forbids; "
            "give data_files to run it offline") in out
