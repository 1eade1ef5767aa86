"""Multiple choice by log-likelihood (BoolQ): each choice's log p(choice | prompt), the argmax is the prediction,
as lm-evaluation-harness's ``output_type: multiple_choice``."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from quant.kinds.base import Aggregate, TaskKind, TaskResult, TaskSpec
from quant.kinds.lm import continuation_logprobs


@dataclasses.dataclass
class ChoiceRecord:
    id: str
    prediction: int  # index of the most likely choice
    label: int
    correct: bool
    logodds: float  # log p(last choice) - log p(first): the threshold-free score (yes - no for BoolQ)
    logprobs: list[float]


class Choice(TaskKind):
    name = "choice"
    record = ChoiceRecord
    options = frozenset({"prompt", "choices", "label_field", "metrics"})

    def known_metrics(self, task: TaskSpec) -> frozenset[str]:
        return frozenset({"accuracy"})

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, task: TaskSpec, items: list[dict],
                 span: range | None, label: str, reference_model: torch.nn.Module | None) -> TaskResult:
        choices = task["choices"]
        requests = [(task["prompt"].format(**item), choices) for item in items]
        batch_size = task.get("batch_size", self.default_batch_size)
        scores = continuation_logprobs(model, tokenizer, requests, batch_size, label)
        records = []
        for item, logprobs in zip(items, scores):
            prediction = max(range(len(choices)), key=logprobs.__getitem__)
            gold = int(item[task["label_field"]])
            records.append(ChoiceRecord(item["id"], prediction, gold, prediction == gold,
                                        logprobs[-1] - logprobs[0], logprobs))
        return self.result(task, records)

    def aggregate(self, metric: str) -> Aggregate:
        return lambda c: c["correct"].mean(-1)

    def answer(self, record: dict) -> Any:
        return record["prediction"]

    def forwards_per_item(self, task: TaskSpec) -> int:
        return len(task["choices"])


KIND = Choice()
