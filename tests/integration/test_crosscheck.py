"""The suite's task definitions against lm-evaluation-harness's own (the default-run subset of ``quant crosscheck``):
a change to a prompt, the choices, the stop strings or an extraction regex moves the baseline and every candidate
alike, so no regression gate notices it; these tests do."""
import json

import pytest

from quant import crosscheck
from quant.data import load as load_data
from quant.kinds.generate import KIND as GENERATE, fewshot_exemplars
from quant.tasks import select_items

pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is not installed: {crosscheck.INSTALL}")

MODEL = "smollm2-135m"


def test_boolq_items_score_the_same_under_lm_eval(matrix, workbench):
    """Four BoolQ items through the suite's evaluator and through lm-eval's boolq task (HFLM around the same model):
    the same prompt and continuations, the same predictions, log-likelihoods within 1e-4."""
    spec = matrix.models[MODEL]
    task = workbench.task(spec, "boolq")
    items = workbench.items(spec, "boolq")[:4]
    model, tokenizer = workbench.baseline(spec)
    agreement = crosscheck.crosscheck(model, tokenizer, task, items, exemplars=[], batch_size=8)
    assert agreement.same_prompt == 4, agreement.disagreements
    assert agreement.same_prediction == {"accuracy": 4}, agreement.disagreements
    assert agreement.max_logprob_diff < 1e-4


def _probing_generations(targets: list[str]) -> list[str]:
    """Generations that tell the two extractions apart: numbers with $, commas and a trailing period, a
    negative number, several answers, and none."""
    shapes = [
        lambda t: f" She pays 3 * 4 = 12 dollars.\n#### {t}",
        lambda t: f" 2 + 3 = 5, so the answer is ${t}.",
        lambda t: f" The total is {t}.\n#### 1,234.",
        lambda t: f"#### {t}\n\nThen 7 more: 19",
        lambda t: " I do not know.",
        lambda t: f" It drops by -{t}, then -12.50.",
        lambda t: f" #### ${t}",
        lambda t: f" The answer is 1,000,000 or {t}",
    ]
    return [shape(t) for shape, t in zip(shapes, targets, strict=True)]


def test_gsm8k_extractions_and_prompts_match_lm_eval(matrix, workbench, shared_data):
    """GSM8K's 5-shot prompt, stop strings, strict and flexible extraction and exact match, against lm-eval's gsm8k
    task on recorded generations: the baseline's own (the test profile's items, cached by the matrix tests) and
    probing texts on further items. No model runs under lm-eval here."""
    spec = matrix.models[MODEL]
    task = workbench.task(spec, "gsm8k")
    recorded_items = workbench.items(spec, "gsm8k")
    recorded = workbench.evaluate(spec, "gsm8k")
    ids = {item["id"] for item in recorded_items}
    probe_items = [i for i in select_items(task, shared_data, 32, seed=1) if i["id"] not in ids][:8]
    probed = GENERATE.score(task, probe_items, _probing_generations([i["target"] for i in probe_items]))
    items, records = recorded_items + probe_items, recorded.items + probed.items
    ours = GENERATE.score(task, items, [r["output"] for r in records])
    assert [r for r in ours.items[: len(recorded_items)]] == recorded.items  # the replayed records are the suite's
    exemplars = fewshot_exemplars(task, load_data(task.loader, shared_data))
    agreement = crosscheck.replay_generations(task, items, exemplars, ours)
    assert agreement.same_prompt == len(items), agreement.disagreements
    both = {"strict-match": len(items), "flexible-extract": len(items)}
    assert agreement.same_prediction == both, agreement.disagreements
    assert agreement.same_correct == agreement.same_prediction, agreement.disagreements
    # The probes are worth something only if both extractions find answers, right and wrong.
    assert 0 < sum(r["answers"]["flexible-extract"] == r["target"] for r in probed.items) < len(probe_items)
    assert 0 < sum(r["answers"]["strict-match"] is not None for r in probed.items) < len(probe_items)


def test_gsm8k_generation_settings_match_lm_eval(matrix, workbench, tmp_path):
    """The stop strings and greedy decoding of lm-eval's gsm8k task, and its ignore patterns for exact match."""
    task = workbench.task(matrix.models[MODEL], "gsm8k")
    harness = crosscheck.lm_eval_task(task, [{"question": "q", "answer": "#### 1"}], [], tmp_path).config
    assert task["until"] == harness.generation_kwargs["until"]
    assert harness.generation_kwargs["do_sample"] is False
    exact_match = next(m for m in harness.metric_list if m["metric"] == "exact_match")
    assert task["ignore"] == exact_match["regexes_to_ignore"]
    assert task.get("ignore_case", False) == exact_match["ignore_case"]


def test_the_crosscheck_command_prints_and_writes_the_agreement(tmp_path, capsys):
    from quant.cli import main

    assert main(["crosscheck", "lm-eval", "--task", "boolq", "--limit", "2", "--profile", "test",
                 "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / f"crosscheck-lm-eval-boolq-{MODEL}-baseline.json").read_text())
    assert written["agrees"] and written["n"] == 2 and written["same_prediction"] == {"accuracy": 2}
    assert "boolq: 2 items; same prompt 2/2" in capsys.readouterr().out
    assert main(["crosscheck", "lm-eval", "--task", "boolq", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
