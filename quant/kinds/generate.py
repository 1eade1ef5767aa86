"""Greedy generation with answer extraction (GSM8K), as lm-evaluation-harness's ``generate_until`` tasks: few-shot
prompts, stop strings, the regex filters and exact match. Each extraction is a metric; the first is the headline."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from quant import data
from quant.config import ConfigError
from quant.kinds.base import Aggregate, Columns, TaskKind, TaskResult, TaskSpec
from quant.kinds.lm import MAX_CONTEXT, batches, encode, pad, text_prefix

SHARED_PREFIX_MIN = 16  # tokens; a shorter common prefix is not worth a cache copy per batch


@dataclasses.dataclass
class GenerateRecord:
    id: str
    output: str  # the generated text, cut at the first stop string
    target: str  # the normalised reference answer
    answers: dict[str, str | None]  # extraction name -> normalised answer (None: nothing matched)
    prediction: str | None  # the headline extraction's answer
    correct: bool  # the headline extraction's exact match


def fewshot_exemplars(task: TaskSpec, items: list[dict]) -> list[dict]:
    """The task's few-shot exemplars from its data, in the configured order."""
    by_id = {item["id"]: item for item in items}
    missing = [i for i in task.get("fewshot_ids", []) if i not in by_id]
    if missing:
        raise ConfigError(f"task {task.name!r}: few-shot id {missing[0]!r} is not in the data")
    return [by_id[i] for i in task.get("fewshot_ids", [])[: task.get("num_fewshot", 0)]]


def _fewshot_prefix(task: TaskSpec, items: list[dict]) -> str:
    shots = [task["prompt"].format(**item) + task["fewshot_target"].format(**item)
             for item in fewshot_exemplars(task, items)]
    delimiter = task.get("fewshot_delimiter", "\n\n")
    return delimiter.join(shots) + (delimiter if shots else "")


def extract_answer(
    text: str, regex: str, group_select: int, ignore: Sequence[str], ignore_case: bool = False
) -> str | None:
    """lm-evaluation-harness's regex filter: the ``group_select``-th match (first non-empty group), then normalised
    as its exact match does (``normalise_answer``); None when nothing matches."""
    matches = re.findall(regex, text)
    if not matches:
        return None
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), "")
    return normalise_answer(match, ignore, ignore_case)


def normalise_answer(text: str, ignore: Sequence[str], ignore_case: bool = False) -> str:
    """The ``ignore`` patterns removed, lower-cased with ``ignore_case`` (lm-eval's exact_match options)."""
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    text = text.strip()
    return text.lower() if ignore_case else text


_STOP_CRITERIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {stop strings: criteria}


def stop_criteria(tokenizer: Any, until: Sequence[str]) -> Any:
    """transformers' stop-string criterion (a StoppingCriteriaList) for ``until``, or None; built once per
    tokenizer and stop strings. Passing ``stop_strings`` to ``generate`` builds it again on every call, which scans
    the whole vocabulary: about 5 s per call measured on an H100 (huggingface/transformers#40520)."""
    from transformers import StopStringCriteria, StoppingCriteriaList

    if not until:
        return None
    built = _STOP_CRITERIA.setdefault(tokenizer, {})
    key = tuple(until)
    if key not in built:
        built[key] = StoppingCriteriaList([StopStringCriteria(tokenizer, list(until))])
    return built[key]


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    """The tokens every sequence starts with, less one: each sequence keeps at least one token of its own."""
    shortest = min(sequences, key=len)
    length = next((n for n, token in enumerate(shortest) if any(s[n] != token for s in sequences)), len(shortest))
    return shortest[: min(length, len(shortest) - 1)]


def _prefill(model: torch.nn.Module, tokens: list[int], device: torch.device) -> Any:
    """The KV cache of ``tokens`` (batch 1)."""
    return model(torch.tensor([tokens], device=device), use_cache=True, logits_to_keep=1).past_key_values


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, task: TaskSpec, items: list[dict], label: str,
             batch_size: int) -> list[str]:
    """Each item's greedy generation, cut at the first stop string. The few-shot exemplars open every prompt:
    their KV cache is computed once and copied into every batch (tokens common to all prompts, so no tokenizer
    boundary is assumed); each batch then prefills only its own questions, padded on the left of them, between
    the shared part and the generation."""
    prompts = [item.get("fewshot", "") + task["prompt"].format(**item) for item in items]
    prefix = text_prefix(tokenizer)
    encoded = [prefix + encode(tokenizer, p)[-(MAX_CONTEXT - len(prefix)):] for p in prompts]
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    until = task.get("until", [])
    shared = _common_prefix(encoded) if task.get("shared_prefix_cache", True) else []
    shared = shared if len(shared) >= SHARED_PREFIX_MIN else []
    shared_cache = _prefill(model, shared, device) if shared else None
    outputs = [""] * len(items)
    for chunk in batches(order, batch_size, label):
        own, own_mask = pad([encoded[i][len(shared):] for i in chunk], tokenizer.pad_token_id, left=True)
        ids = torch.cat([torch.tensor([shared] * len(chunk), dtype=torch.long).view(len(chunk), -1), own], 1)
        mask = torch.cat([torch.ones(len(chunk), len(shared), dtype=torch.long), own_mask], 1)
        cache = None
        if shared_cache is not None:
            cache = copy.deepcopy(shared_cache)
            cache.batch_repeat_interleave(len(chunk))
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
            max_new_tokens=task.get("max_new_tokens", 256), do_sample=False, pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stop_criteria(tokenizer, until),
        )
        for row, i in enumerate(chunk):
            text = tokenizer.decode(generated[row, ids.shape[1]:], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            outputs[i] = text
    return outputs


class Generate(TaskKind):
    name = "generate"
    record = GenerateRecord
    options = frozenset({"prompt", "fewshot_target", "fewshot_delimiter", "num_fewshot", "fewshot_ids", "until",
                         "max_new_tokens", "target_field", "extract", "ignore", "ignore_case", "shared_prefix_cache"})

    def metrics(self, task: TaskSpec) -> list[str]:
        """The extractions, in tasks.yaml's order: each is a metric (its exact match), the first the headline."""
        return list(task["extract"])

    def known_metrics(self, task: TaskSpec) -> frozenset[str]:
        return frozenset(task["extract"])

    def select(self, task: TaskSpec, items: list[dict], limit: int | None, seed: int) -> list[dict]:
        """The subset without the few-shot exemplars, each item carrying the few-shot prefix."""
        chosen = data.subset(items, limit, seed, exclude=set(task.get("fewshot_ids", [])))
        if not task.get("num_fewshot"):
            return chosen
        prefix = _fewshot_prefix(task, items)
        return [{**item, "fewshot": prefix} for item in chosen]

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, task: TaskSpec, items: list[dict],
                 span: range | None, label: str, reference_model: torch.nn.Module | None) -> TaskResult:
        outputs = generate(model, tokenizer, task, items, label, task.get("batch_size", self.default_batch_size))
        return self.score(task, items, outputs)

    def score(self, task: TaskSpec, items: list[dict], outputs: list[str]) -> TaskResult:
        """Each extraction's answer from each generated text, against the item's target."""
        ignore, ignore_case = task.get("ignore", []), task.get("ignore_case", False)
        headline = self.metrics(task)[0]
        records = []
        for item, output in zip(items, outputs):
            target = normalise_answer(str(item[task["target_field"]]), ignore, ignore_case)
            answers = {name: extract_answer(output, rule["regex"], rule["group_select"], ignore, ignore_case)
                       for name, rule in task["extract"].items()}
            records.append(GenerateRecord(item["id"], output, target, answers, answers[headline],
                                          answers[headline] == target))
        return self.result(task, records)

    def columns(self, records: list[dict]) -> Columns:
        """Per extraction, whether it matched the target; ``answered``: whether the headline found an answer."""
        columns = {name: np.array([r["answers"][name] == r["target"] for r in records], dtype=float)
                   for name in records[0]["answers"]}
        columns["correct"] = np.array([r["correct"] for r in records], dtype=float)
        columns["answered"] = np.array([r["prediction"] is not None for r in records], dtype=float)
        return columns

    def aggregate(self, metric: str) -> Aggregate:
        return lambda c: c[metric].mean(-1)

    def answer(self, record: dict) -> Any:
        return record["prediction"]

    def seconds(self, task: TaskSpec, items: int, costs: dict[str, Any]) -> float | None:
        if "generate_step" not in costs:
            return None
        steps = math.ceil(items / task.get("batch_size", self.default_batch_size)) * task.get("max_new_tokens", 256)
        return steps * costs["generate_step"]


KIND = Generate()
