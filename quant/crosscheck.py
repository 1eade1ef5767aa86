"""Cross-check against lm-evaluation-harness (the optional ``lm-eval`` extra). lm-eval scores the suite's own items
with its *own* task definitions (the boolq and gsm8k YAML shipped in the package, pointed at a local JSONL of the
items and at the suite's few-shot exemplars, so no hub is read), and the two are compared item by item: the prompts
each builds, the predictions, the log-likelihoods, and GSM8K's strict and flexible extraction of the same
generations. A task definition here that drifts from lm-eval's shows up as a disagreement."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from quant.config import ConfigError
from quant.kinds import kind_of
from quant.kinds.generate import extract_answer, normalise_answer
from quant.tasks import TaskResult, TaskSpec, evaluate

INSTALL = 'pip install -e ".[lm-eval]"'
# The lm-eval task definition each suite task is checked against, relative to lm_eval/tasks/.
LM_EVAL_TASKS = {"boolq": "super_glue/boolq/default.yaml", "gsm8k": "gsm8k/gsm8k.yaml"}
INVALID = "[invalid]"  # lm-eval's regex filter's answer when nothing matches (the suite records None)


@dataclasses.dataclass
class Agreement:
    """How one task's items scored under the suite's evaluator and under lm-eval."""
    task: str
    n: int
    same_prompt: int                  # items whose full prompt (context) is the same string in both
    same_prediction: dict[str, int]   # per metric / extraction: items with the same prediction
    same_correct: dict[str, int]      # ... and the same correct / wrong verdict
    metric_ours: dict[str, float]
    metric_lm_eval: dict[str, float]
    max_logprob_diff: float | None = None  # choice tasks: the largest |log-likelihood difference| over items x choices
    same_generation: int | None = None     # generation tasks run by both: identical generated text
    disagreements: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return self.same_prompt == self.n and all(v == self.n for v in self.same_prediction.values())

    def lines(self) -> list[str]:
        lines = [f"{self.task}: {self.n} items; same prompt {self.same_prompt}/{self.n}"]
        for name in self.same_prediction:
            lines.append(f"  {name}: same prediction {self.same_prediction[name]}/{self.n}, same verdict "
                         f"{self.same_correct[name]}/{self.n}; suite {self.metric_ours[name]:.4f}, "
                         f"lm-eval {self.metric_lm_eval[name]:.4f}")
        if self.max_logprob_diff is not None:
            lines.append(f"  largest |log-likelihood difference|: {self.max_logprob_diff:.2e}")
        if self.same_generation is not None:
            lines.append(f"  identical generations: {self.same_generation}/{self.n}")
        lines += [f"  differs: {json.dumps(d, ensure_ascii=False)[:300]}" for d in self.disagreements[:5]]
        return lines


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as error:
        raise ConfigError(f"the lm-eval cross-check needs lm-evaluation-harness ({error}); "
                          f"install it with: {INSTALL}") from None
    return lm_eval


def lm_eval_task(task: TaskSpec, items: list[dict], exemplars: list[dict], folder: Path) -> Any:
    """lm-eval's own definition of ``task`` (its YAML), reading ``items`` in order from a JSONL in ``folder`` and
    taking the few-shot ``exemplars`` in order (the suite's; the shared data has no train split)."""
    lm_eval = require_lm_eval()
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    if task.name not in LM_EVAL_TASKS:
        raise ConfigError(f"no lm-eval counterpart for task {task.name!r}; cross-checked: {sorted(LM_EVAL_TASKS)}")
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_TASKS[task.name])
    files = {"test": _write_jsonl(folder / "items.jsonl", items)}
    if exemplars:
        files["train"] = _write_jsonl(folder / "exemplars.jsonl", exemplars)
    config.pop("tag", None)
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
                  test_split="test", validation_split=None, training_split=None,
                  fewshot_split="train" if exemplars else None, fewshot_config={"sampler": "first_n"})
    if task.kind == "generate":
        # The generation budget is a run setting, not part of the definition: both get the same one.
        config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": task.get("max_new_tokens", 256)}
    return ConfigurableTask(config=config)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            fields = {k: int(v) if isinstance(v, bool) else v for k, v in row.items() if k != "fewshot"}
            out.write(json.dumps(fields, ensure_ascii=False) + "\n")
    return str(path)


def lm_eval_samples(lm: Any, task: TaskSpec, items: list[dict], exemplars: list[dict]) -> list[dict]:
    """lm-eval's per-sample log of ``task`` on ``items`` with the LM ``lm`` (one per item and filter)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="quant-lm-eval-") as folder:
        harness_task = lm_eval_task(task, items, exemplars, Path(folder))
        # The task is passed built: a manager without lm-eval's own index, whose scan of its 14,000 task YAMLs took
        # 15 s per call. No seeds: lm-eval would reseed the global RNGs, a side effect on the caller (first_n needs
        # none).
        output = lm_eval.simple_evaluate(model=lm, tasks=[harness_task], log_samples=True, bootstrap_iters=0,
                                         task_manager=TaskManager(include_path=folder, include_defaults=False),
                                         random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                                         fewshot_random_seed=None,
                                         num_fewshot=task.get("num_fewshot"))
    return sorted(output["samples"][harness_task.config.task], key=lambda s: (s["doc_id"], s["filter"]))


def suite_prompt(task: TaskSpec, item: dict) -> str:
    """The full context the suite's evaluator scores or generates from (few-shot prefix included)."""
    return item.get("fewshot", "") + task["prompt"].format(**item)


def compare_choice(task: TaskSpec, items: list[dict], ours: TaskResult, samples: list[dict]) -> Agreement:
    choices = task["choices"]
    same_prompt = same_prediction = same_correct = 0
    largest, differs = 0.0, []
    for item, record, sample in zip(items, ours.items, samples, strict=True):
        contexts = [args[0] for args in sample["arguments"]]
        continuations = [args[1] for args in sample["arguments"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        prediction = max(range(len(theirs)), key=theirs.__getitem__)
        prompt_matches = all(c == suite_prompt(task, item) for c in contexts) and continuations == choices
        same_prompt += prompt_matches
        same_prediction += prediction == record["prediction"]
        same_correct += bool(sample["acc"]) == record["correct"]
        gap = max(abs(a - b) for a, b in zip(theirs, record["logprobs"], strict=True))
        largest = max(largest, gap)
        if not prompt_matches or prediction != record["prediction"]:
            differs.append({"id": item["id"], "suite": record["logprobs"], "lm_eval": theirs,
                            "lm_eval_continuations": continuations})
    metric = kind_of(task).metrics(task)[0]
    return Agreement(task.name, len(items), same_prompt, {metric: same_prediction}, {metric: same_correct},
                     {metric: ours.metrics[metric]}, {metric: sum(s["acc"] for s in samples) / len(samples)},
                     max_logprob_diff=largest, disagreements=differs)


def compare_generate(task: TaskSpec, items: list[dict], ours: TaskResult, samples: list[dict],
                     compare_text: bool) -> Agreement:
    """Per extraction: lm-eval's filtered answer and exact match against the suite's on the same item. The suite's
    extraction is applied to lm-eval's generation, so the comparison holds the text fixed even where the two
    generated differently (``compare_text`` counts those)."""
    by_doc: dict[int, dict[str, dict]] = {}
    for sample in samples:
        by_doc.setdefault(sample["doc_id"], {})[sample["filter"]] = sample
    extractors, ignore, ignore_case = task["extract"], task.get("ignore", []), task.get("ignore_case", False)
    same_prediction = dict.fromkeys(extractors, 0)
    same_correct = dict.fromkeys(extractors, 0)
    correct_theirs = dict.fromkeys(extractors, 0.0)
    same_prompt = same_text = 0
    differs = []
    for doc_id, (item, record) in enumerate(zip(items, ours.items, strict=True)):
        filtered = by_doc[doc_id]
        first = next(iter(filtered.values()))
        context, generation = first["arguments"][0][0], first["resps"][0][0]
        same_prompt += context == suite_prompt(task, item)
        same_text += generation == record["output"]
        for name, rule in extractors.items():
            if name not in filtered:
                raise ConfigError(f"lm-eval's {task.name} has no filter {name!r} (it has {sorted(filtered)})")
            # lm-eval removes the ignored patterns in its metric, the suite in its extraction: compare after both.
            raw = filtered[name]["filtered_resps"][0]
            theirs = None if raw == INVALID else normalise_answer(raw, ignore, ignore_case)
            theirs_correct = bool(filtered[name]["exact_match"])
            ours_on_text = extract_answer(generation, rule["regex"], rule["group_select"], ignore, ignore_case)
            ours_correct = ours_on_text == record["target"]
            same_prediction[name] += ours_on_text == theirs
            same_correct[name] += ours_correct == theirs_correct
            correct_theirs[name] += theirs_correct
            if ours_on_text != theirs or ours_correct != theirs_correct:
                differs.append({"id": item["id"], "extraction": name, "suite": ours_on_text, "lm_eval": raw,
                                "target": record["target"], "generation": generation[-200:]})
    n = len(items)
    return Agreement(task.name, n, same_prompt, same_prediction, same_correct,
                     {name: ours.metrics[name] for name in extractors},
                     {name: correct_theirs[name] / n for name in extractors},
                     same_generation=same_text if compare_text else None, disagreements=differs)


def crosscheck(model: Any, tokenizer: Any, task: TaskSpec, items: list[dict], exemplars: list[dict],
               batch_size: int | None = None) -> Agreement:
    """Score ``items`` with the suite's evaluator and with lm-eval (HFLM around the same model) and compare."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    size = batch_size or task.get("batch_size", 8)
    ours = evaluate(model, tokenizer, task, items, label=f"{task.name} [suite]")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=size, max_length=2048)
    samples = lm_eval_samples(lm, task, items, exemplars)
    if task.kind == "choice":
        return compare_choice(task, items, ours, samples)
    if task.kind == "generate":
        return compare_generate(task, items, ours, samples, compare_text=True)
    raise ConfigError(f"task {task.name!r} of kind {task.kind!r} has no lm-eval cross-check")


def replay_generations(task: TaskSpec, items: list[dict], exemplars: list[dict], ours: TaskResult) -> Agreement:
    """lm-eval's filters and metric applied to the suite's recorded generations (no model runs): the prompts lm-eval
    builds, its strict and flexible extraction and its exact match, against the suite's."""
    require_lm_eval()
    from lm_eval.api.model import LM

    outputs = {suite_prompt(task, item): record["output"] for item, record in zip(items, ours.items, strict=True)}

    class Replay(LM):
        """Answers each generation request with the suite's recorded output for the same prompt."""

        def generate_until(self, requests: list) -> list[str]:
            return [outputs.get(request.args[0], "") for request in requests]

        def loglikelihood(self, requests: list) -> list:
            raise NotImplementedError("replay holds generations only")

        loglikelihood_rolling = loglikelihood

    return compare_generate(task, items, ours, lm_eval_samples(Replay(), task, items, exemplars), compare_text=False)
