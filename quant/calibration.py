"""The calibration part of the data code: a text as token ids, and the seeded windows drawn from its second half
that calibrated methods see. It is the code of every calibrated model's cache key (``quant.stores``), kept apart
from the task loaders, so that editing how a task reads its data rebuilds no quantized model."""
from __future__ import annotations

from typing import Any

import torch

from quant.config import DataError


def text_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as token ids, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


def calibration_windows(token_ids: torch.Tensor, samples: int, tokens: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``tokens`` tokens drawn (seeded) from the second half of a tokenized text
    [samples, tokens]. Perplexity windows are taken from the start of the same text and never reach it."""
    half = len(token_ids) // 2
    if len(token_ids) - half <= tokens:
        raise DataError(f"calibration text too short: {len(token_ids)} tokens for {tokens}-token windows")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(half, len(token_ids) - tokens, (samples,), generator=generator)
    return torch.stack([token_ids[s : s + tokens] for s in starts])
