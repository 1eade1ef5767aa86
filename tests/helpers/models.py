"""Tiny random models and quantized layers that build in a fraction of a second: no model file is read."""
from __future__ import annotations

import torch
from torch import nn

from quant.methods import METHODS
from quant.qlinear import QuantLinear

# the methods that read calibration data: their checks come from the registry, so a new method gets them
CALIBRATED_METHODS = sorted(name for name, method in METHODS.items() if method.needs_calibration)


def tiny_llama(vocab_size: int = 128, hidden_size: int = 96, intermediate_size: int = 192,
               max_position_embeddings: int = 64) -> nn.Module:
    """A 2-block LLaMA with grouped-query attention and tied embeddings, seeded. The default widths: group size 64
    does not divide 96 (fallback to 32), and 128 exceeds it (per-channel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def kernel_layer(out_features: int, in_features: int, group_size: int, sym: bool = True, bits: int = 4,
                 seed: int = 0) -> QuantLinear:
    """A packed layer with every optional part a fast kernel must carry: zero points, a bias, an input scale."""
    return quantized_layer(out_features, in_features, group_size, sym, bits, seed, bias=True, input_scale=True)


def quantized_layer(out_features: int, in_features: int, group_size: int, sym: bool = True, bits: int = 4,
                    seed: int = 0, bias: bool = False, input_scale: bool = False) -> QuantLinear:
    """A packed layer of random codes, scales (and zero points, bias, input scale when asked), seeded."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (out_features, in_features), generator=generator)
    scales = torch.rand(out_features, in_features // group_size, generator=generator) * 0.01 + 1e-3
    zeros = torch.randint(0, 2**bits, scales.shape, generator=generator).float()
    return QuantLinear.from_quantized(
        q, scales, zeros, bits, group_size, sym, bias=torch.randn(out_features, generator=generator) if bias else None,
        input_scale=torch.rand(in_features, generator=generator) + 0.5 if input_scale else None)
