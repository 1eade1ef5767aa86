"""Multiple choice by log-likelihood (BoolQ): each choice's log p(choice | prompt), the argmax is the prediction,
as lm-evaluation-harness's ``output_type: multiple_choice``."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from quant import stats
from quant.kinds.base import Aggregate, Columns, Informativeness, TaskKind, TaskResult, TaskSpec
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

    def informativeness(self, task: TaskSpec, gate: dict[str, Any], metric: str, baseline_metrics: dict[str, float],
                        baseline: Columns, candidate: Columns) -> Informativeness:
        """Informative when the baseline beats always answering the commoner label by ``chance_margin``. Near
        chance, the decisions are coin flips that any perturbation changes; the score behind them still
        correlates with the baseline's unless the model is broken: that is the fallback."""
        labels = baseline["label"].astype(int).tolist()
        chance = stats.majority_rate(labels)
        base_scores, candidate_scores = baseline["logodds"].tolist(), candidate["logodds"].tolist()
        correlation = stats.correlation(base_scores, candidate_scores)
        signals: dict[str, Any] = {"chance": chance, "score_correlation": correlation}
        if len(task["choices"]) == 2:
            signals["roc_auc_baseline"] = stats.roc_auc(base_scores, labels)
            signals["roc_auc_quantized"] = stats.roc_auc(candidate_scores, labels)
        return Informativeness(baseline_metrics[metric] >= chance + gate["chance_margin"],
                               ("score correlation with the baseline", correlation, gate["correlation_min"]), signals)


KIND = Choice()
