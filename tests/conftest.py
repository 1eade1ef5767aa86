"""Fixtures for unit tests: a tiny random LLaMA that quantizes in a second."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # hidden 96: group size 64 does not divide it (fallback to 32), 128 exceeds it (per-channel)
    config = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def calibration_ids():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
