"""Perplexity over non-overlapping windows (WikiText), and beside the baseline the statistics of llama.cpp's
``--kl-divergence``: KL(baseline || model) per token over the whole vocabulary, the same-top-token rate and
ln(PPL(model) / PPL(baseline))."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from quant.kinds.base import Aggregate, TaskKind, TaskResult, TaskSpec
from quant.calibration import text_ids
from quant.kinds.lm import batches, text_prefix

# llama.cpp --kl-divergence's statistics, reported beside each perplexity row
DIVERGENCE_METRICS = ("mean_kld", "mean_kld_se", "median_kld", "p99_kld", "same_top_p", "ln_ppl_ratio")

# Positions per pass of the output projection: a [4, 32, 49k] float32 chunk of logits is 25 MB, under glibc's
# 32 MB mmap threshold, so the allocator reuses it; whole windows' vocabulary-sized tensors (400 MB each) would
# come as fresh pages on every batch.
LOGIT_CHUNK = 32


@dataclasses.dataclass
class WindowRecord:
    id: str
    nll: float  # summed negative log-likelihood of the window's predicted tokens
    tokens: int  # tokens predicted (the window less its first)


@dataclasses.dataclass
class ComparedWindowRecord(WindowRecord):
    base_nll: float  # the baseline's nll on the same window
    kld_tokens: list[float]  # KL(baseline || model) at each predicted token
    same_top: int  # tokens where both models' most likely next token agree


def perplexity_windows(tokenizer: Any, text: str, window: int) -> list[torch.Tensor]:
    """Non-overlapping ``window``-token windows from the start of the text, each opening with the tokenizer's
    own prefix (``text_prefix``: a BOS for Llama-3, nothing for SmolLM2) and filled with the text's next tokens.
    Evaluation uses the first windows; calibration draws from the second half of the text (``text_ids``)."""
    prefix = text_prefix(tokenizer)
    body = window - len(prefix)
    ids = text_ids(tokenizer, text)
    rows = ids[: len(ids) // body * body].view(-1, body)
    return list(torch.cat([torch.tensor(prefix, dtype=ids.dtype).expand(len(rows), -1), rows], dim=1))


def full_kld(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || q) = sum_v p_v (log p_v - log q_v) over the whole vocabulary; [..., vocab] -> [...]. One
    vocabulary-sized temporary besides exp(p_log), multiplied in place (4x faster than three temporaries here)."""
    return torch.sub(p_log, q_log).mul_(p_log.exp()).sum(-1)


def _logprobs(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """log p(next token) over the vocabulary from the trunk's last hidden states, in float32."""
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1)


class Perplexity(TaskKind):
    name = "perplexity"
    record = WindowRecord
    options = frozenset({"window", "metrics"})
    lower_is_better = frozenset({"perplexity", *DIVERGENCE_METRICS}) - {"same_top_p"}
    uses_reference = True
    unit = "windows"
    default_batch_size = 4

    def known_metrics(self, task: TaskSpec) -> frozenset[str]:
        return frozenset({"perplexity"})

    def select(self, task: TaskSpec, items: list[dict], limit: int | None, seed: int) -> list[dict]:
        return items  # one text; a span counts its windows, cut by the evaluator

    def span_items(self, items: list[dict], span: range) -> list[dict]:
        return items

    def size(self, task: TaskSpec, items: list[dict], limit: int | None, tokenizer: Callable[[], Any]) -> int:
        return limit if limit is not None else len(perplexity_windows(tokenizer(), items[0]["text"], task["window"]))

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, task: TaskSpec, items: list[dict],
                 span: range | None, label: str, reference_model: torch.nn.Module | None) -> TaskResult:
        return self.evaluate_models([model], tokenizer, task, items, span, label, reference_model)[0]

    @torch.no_grad()
    def evaluate_models(self, models: list[torch.nn.Module], tokenizer: Any, task: TaskSpec, items: list[dict],
                        span: range | None, label: str,
                        reference_model: torch.nn.Module | None = None) -> list[TaskResult]:
        """Each model's result over the same windows. With ``reference_model`` (the baseline), it runs beside the
        models on each batch, so the divergences are taken per token over the whole vocabulary with nothing
        vocabulary-sized kept. One reference forward per batch serves every model: N variants cost N + 1 forwards
        per window, not 2N, and the reference's own result comes last in the list. Each model's result is the
        one it gets alone."""
        window = task["window"]
        every_window = perplexity_windows(tokenizer, items[0]["text"], window)
        first = span.start if span is not None else 0
        windows = every_window[first : span.stop if span is not None else None]
        device = next(models[0].parameters()).device
        compared = [*models, reference_model] if reference_model is not None else list(models)
        nll = [torch.zeros(len(windows), dtype=torch.float64) for _ in compared]
        kld = [torch.zeros(len(windows), window - 1) for _ in models]
        same_top = [torch.zeros(len(windows), dtype=torch.long) for _ in models]
        for chunk in batches(range(len(windows)), task.get("batch_size", self.default_batch_size), label, "window"):
            ids = torch.stack([windows[i] for i in chunk]).to(device)
            targets = ids[:, 1:]
            hidden = [model.base_model(ids).last_hidden_state[:, :-1] for model in compared]
            for start in range(0, window - 1, LOGIT_CHUNK):
                span = slice(start, start + LOGIT_CHUNK)
                logprobs = [_logprobs(model, h[:, span]) for model, h in zip(compared, hidden)]
                for own, lp in zip(nll, logprobs):
                    own[chunk] -= lp.gather(-1, targets[:, span, None]).squeeze(-1).sum(-1).double().cpu()
                if reference_model is None:
                    continue
                base = logprobs[-1]
                base_top = base.argmax(-1)
                for m, lp in enumerate(logprobs[:-1]):
                    same_top[m][chunk] += (lp.argmax(-1) == base_top).sum(-1).cpu()
                    kld[m][chunk, span] = full_kld(base, lp).cpu()
        results = []
        for m in range(len(compared)):
            against_reference = reference_model is not None and m < len(models)  # the reference itself is last
            records = [
                ComparedWindowRecord(f"window-{first + i}", float(nll[m][i]), window - 1, float(nll[-1][i]),
                                     [round(v, 6) for v in kld[m][i].tolist()], int(same_top[m][i]))
                if against_reference else WindowRecord(f"window-{first + i}", float(nll[m][i]), window - 1)
                for i in range(len(windows))]
            results.append(self.result(task, records))
        return results

    def aggregate(self, metric: str) -> Aggregate:
        return lambda c: np.exp(c["nll"].sum(-1) / c["tokens"].sum(-1))

    def summarize(self, task: TaskSpec, items: list[dict[str, Any]]) -> TaskResult:
        """Perplexity, and with the baseline's windows beside it the divergence statistics over every token."""
        result = super().summarize(task, items)
        if not items or "kld_tokens" not in items[0]:
            return result
        total_tokens = sum(r["tokens"] for r in items)
        klds = torch.tensor([v for r in items for v in r["kld_tokens"]], dtype=torch.float64)
        result.metrics.update({
            "mean_kld": float(klds.mean()), "mean_kld_se": float(klds.std() / math.sqrt(len(klds))),
            "median_kld": float(klds.median()), "p99_kld": float(klds.quantile(0.99)),
            "same_top_p": sum(r["same_top"] for r in items) / total_tokens,
            "ln_ppl_ratio": (sum(r["nll"] for r in items) - sum(r["base_nll"] for r in items)) / total_tokens,
        })
        return result


KIND = Perplexity()
