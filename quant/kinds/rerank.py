"""Re-ranking BM25's top-k passages by query likelihood given the passage (UPR, Sachan et al. 2022), scored as
trec_eval scores TREC DL: nDCG@10 and MRR@10, with BM25's own order of the same candidates as the reference."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from quant.kinds.base import Aggregate, TaskKind, TaskResult, TaskSpec
from quant.kinds.lm import continuation_logprobs
from quant.metrics import mrr_at_k, ndcg_at_k

# metric name -> per-item record field
FIELDS = {"ndcg@10": "ndcg", "mrr@10": "mrr", "bm25_ndcg@10": "bm25_ndcg", "bm25_mrr@10": "bm25_mrr"}


@dataclasses.dataclass
class RerankRecord:
    id: str
    ranking: list[str]  # docids, best first
    ndcg: float
    mrr: float
    bm25_ndcg: float  # BM25's order of the same candidates
    bm25_mrr: float


def rank_metrics(ranking: list[dict], judged: list[int], relevant_min: int) -> tuple[float, float]:
    """(nDCG@10, MRR@10) of a ranked candidate list, TREC-style: unjudged passages count as grade 0, MRR's
    relevance is a grade of at least ``relevant_min`` (TREC DL passage: 2)."""
    grades = [c["label"] or 0 for c in ranking]
    return ndcg_at_k(grades, judged, 10), mrr_at_k([g >= relevant_min for g in grades], 10)


class Rerank(TaskKind):
    name = "rerank"
    record = RerankRecord
    options = frozenset({"prompt", "continuation", "top_k", "relevant_min", "metrics"})
    default_batch_size = 16

    def known_metrics(self, task: TaskSpec) -> frozenset[str]:
        return frozenset({"ndcg@10", "mrr@10"})

    def reported(self, task: TaskSpec) -> list[str]:
        return [*self.metrics(task), *(f"bm25_{metric}" for metric in self.metrics(task))]

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, task: TaskSpec, items: list[dict],
                 span: range | None, label: str, reference_model: torch.nn.Module | None) -> TaskResult:
        top_k = task["top_k"]
        requests, owners = [], []
        for index, item in enumerate(items):
            for candidate in item["candidates"][:top_k]:
                prompt = task["prompt"].format(passage=candidate["text"], **item)
                requests.append((prompt, [task["continuation"].format(**item)]))
                owners.append((index, candidate))
        batch_size = task.get("batch_size", self.default_batch_size)
        scores = continuation_logprobs(model, tokenizer, requests, batch_size, label)
        ranked: dict[int, list[tuple[float, dict]]] = {}
        for (index, candidate), (score,) in zip(owners, scores):
            ranked.setdefault(index, []).append((score, candidate))
        records = []
        for index, item in enumerate(items):
            # Stable sort: ties keep BM25 order, so equal scores never reorder by accident.
            order = [c for _, c in sorted(ranked[index], key=lambda pair: -pair[0])]
            ndcg, mrr = rank_metrics(order, item["judged"], task["relevant_min"])
            # BM25's own order of the same candidates: the reference a re-ranker must beat to say anything
            bm25_ndcg, bm25_mrr = rank_metrics(item["candidates"], item["judged"], task["relevant_min"])
            records.append(RerankRecord(item["id"], [c["docid"] for c in order], ndcg, mrr, bm25_ndcg, bm25_mrr))
        return self.result(task, records)

    def aggregate(self, metric: str) -> Aggregate:
        field = FIELDS[metric]
        return lambda c: c[field].mean(-1)

    def answer(self, record: dict) -> Any:
        return record["ranking"][0]

    def forwards_per_item(self, task: TaskSpec) -> int:
        return task["top_k"]


KIND = Rerank()
