"""Scoring text with a causal LM, shared by the task kinds: batching with padding, the tokenizer's own text prefix,
and the log-likelihood of continuations after contexts."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

MAX_CONTEXT = 2048  # tokens; longer contexts are cut from the left (BoolQ passages, few-shot prompts)


def batches(order: Sequence[int], size: int, label: str, unit: str = "item") -> Iterator[list[int]]:
    with tqdm(total=len(order), desc=label, unit=unit, mininterval=10, leave=False) as bar:
        for start in range(0, len(order), size):
            chunk = list(order[start : start + size])
            yield chunk
            bar.update(len(chunk))


def pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq)
        mask[row, span] = 1
    return ids, mask


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def text_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer itself puts before a text: Llama-3's <|begin_of_text|> (its add_bos_token), none for
    SmolLM2 or Qwen2. Contexts, prompts and perplexity windows start with them, as the model saw text in training;
    scoring without them inflates a BOS model's perplexity. (lm-eval would prefix perplexity windows with any BOS
    the tokenizer has; this follows the tokenizer's own rule.)"""
    with_special = tokenizer("x").input_ids
    plain = tokenizer("x", add_special_tokens=False).input_ids
    prefix_length = len(with_special) - len(plain)
    return list(with_special[:prefix_length]) if with_special[prefix_length:] == plain else []


@dataclasses.dataclass(frozen=True)
class _Sequence:
    """One forward's tokens: a request's context and the continuations read from it, each as (index, token ids)."""
    request: int
    context: list[int]
    continuations: list[tuple[int, list[int]]]

    @property
    def tokens(self) -> list[int]:
        # Single-token continuations are read from the context's last logits; a longer one (alone in its
        # sequence) is fed in after the context.
        if all(len(cont) == 1 for _, cont in self.continuations):
            return self.context
        return self.context + self.continuations[0][1]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, requests: list[tuple[str, list[str]]], batch_size: int,
                          label: str) -> list[list[float]]:
    """Sum of log p(continuation | context) for each context's continuations. When every continuation of a context is
    one token (BoolQ's " no" / " yes"), one forward of the context scores them all from its last logits; otherwise
    each (context, continuation) is a sequence of its own. Batched with right padding, longest first."""
    prefix, sequences = text_prefix(tokenizer), []
    for index, (context, continuations) in enumerate(requests):
        encoded = [encode(tokenizer, c) for c in continuations]
        longest = max(len(c) for c in encoded)
        ctx = prefix + encode(tokenizer, context)[-(MAX_CONTEXT - longest - len(prefix)):]
        if longest == 1:
            sequences.append(_Sequence(index, ctx, list(enumerate(encoded))))
        else:
            sequences += [_Sequence(index, ctx, [(j, cont)]) for j, cont in enumerate(encoded)]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].tokens))
    device = next(model.parameters()).device
    scores = [[0.0] * len(continuations) for _, continuations in requests]
    for chunk in batches(order, batch_size, label, unit="sequence"):
        ids, mask = pad([sequences[i].tokens for i in chunk], tokenizer.pad_token_id, left=False)
        # Logits only where a continuation is read: from each context's last token on, as many positions as the
        # batch's longest continuation (the lm_head and log-softmax over a 49k vocabulary at every position of
        # a 150-token passage cost about a fifth of each forward).
        reads = max(len(cont) for i in chunk for _, cont in sequences[i].continuations)
        starts = torch.tensor([len(sequences[i].context) - 1 for i in chunk])
        keep = (starts[:, None] + torch.arange(reads)).clamp(max=ids.shape[1] - 1)
        logits = model(ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        for row, i in enumerate(chunk):
            for j, cont in sequences[i].continuations:
                scores[sequences[i].request][j] = float(logprobs[row, torch.arange(len(cont)), torch.tensor(cont)].sum())
    return scores
