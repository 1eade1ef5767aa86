"""GSQ: activation-aware group scaling (AWQ, Lin et al., 2024), the method of the reference study.

Input channels that see large activations are salient: scaling their weights up by s (and the activation
down by 1/s) before round-to-nearest quantization shrinks their relative rounding error. Per block and per
scaling group (layers that share one input), search s = mean|x|^alpha over a grid of alpha for the value
that minimises the group's output error on calibration activations, fold 1/s into the operation that
produces the input (a norm, or a linear on a linear path), else keep it as an explicit input scale; then
quantize in groups. Optionally search a per-group clipping ratio of the weight range as well.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch
from torch import nn

from quant.config import QuantConfig
from quant.methods.base import (
    LayerRecord, Quantizer, block_linears, dequantize, effective_group_size, pack_layer, replace_module,
    rtn_codes, run_block, sequential_blocks, skipped_record,
)

log = logging.getLogger("quant")


class ScalingGroup(NamedTuple):
    """Linears that read the same input, and the module producing that input (None: not foldable)."""

    prev: str | None
    linears: tuple[str, ...]


# Per-architecture table (config.model_type -> groups), as AWQ groups layers; a new architecture is an entry.
# v_proj -> o_proj folds only when v_proj's output width equals o_proj's input (no grouped-query attention);
# otherwise the scale stays explicit. Phi's fc1 -> fc2 passes through GELU, so it can never fold.
_LLAMA = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
)
SCALING_GROUPS: dict[str, tuple[ScalingGroup, ...]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "phi": (
        ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),
        ScalingGroup("self_attn.v_proj", ("self_attn.dense",)),
        ScalingGroup(None, ("mlp.fc2",)),
    ),
}



def _fake_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    q, scales, zeros = rtn_codes(weight, bits, group_size, sym)
    rows = weight.shape[0]
    grouped = dequantize(q.view(rows, -1, group_size), scales.unsqueeze(-1), zeros.unsqueeze(-1))
    return grouped.view_as(weight)


class GSQ(Quantizer):
    name = "gsq"
    needs_calibration = True

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None
    ) -> list[LayerRecord]:
        model_type = model.config.model_type
        if model_type not in SCALING_GROUPS:
            raise ValueError(f"GSQ: no scaling-group table for model_type {model_type!r}; add it to SCALING_GROUPS")
        records: list[LayerRecord] = []
        for step in sequential_blocks(model, calibration, self.name):
            block_name, block = step.name, step.block
            layer_configs = {
                name: config.for_layer(f"{block_name}.{name}") for name in block_linears(block)
            }
            # Inputs of every linear, captured once before any scaling: folding is exact, so a group's
            # input changes only by its own 1/s, which the search accounts for.
            features = _linear_inputs(block, step.inputs, step.kwargs, config.search_tokens)
            explicit_scales: dict[str, torch.Tensor] = {}
            for group in SCALING_GROUPS[model_type]:
                names = [n for n in group.linears if layer_configs[n] is not None]
                if names:
                    x_mean, sample = features[names[0]]
                    scale = _search_scale(block, names, x_mean, sample, layer_configs[names[0]])
                    if not _fold_scale(block, group.prev, names, scale):
                        explicit_scales.update({n: scale for n in names})
            for name, linear in block_linears(block).items():
                full_name = f"{block_name}.{name}"
                layer_config = layer_configs[name]
                if layer_config is None:
                    records.append(skipped_record(full_name, linear, config))
                    continue
                layer_started = time.perf_counter()
                group_size, _ = effective_group_size(linear.in_features, layer_config.group_size)
                weight = linear.weight.detach().float()
                note = None
                if layer_config.clip_search:
                    sample = features[name][1] / explicit_scales.get(name, 1.0)
                    weight, ratio = _search_clip(weight, sample, layer_config.bits, group_size, layer_config.sym)
                    note = f"mean clip ratio {ratio:.3f}"
                q, scales, zeros = rtn_codes(weight, layer_config.bits, group_size, layer_config.sym)
                qlayer, record = pack_layer(
                    full_name, linear, layer_config, q, scales, zeros, group_size, layer_started,
                    input_scale=explicit_scales.get(name), note=note,
                )
                replace_module(block, name, qlayer)
                records.append(record)
        return records


def _linear_inputs(block: nn.Module, inputs: torch.Tensor, kwargs: dict, tokens: int) -> dict[str, tuple]:
    """Per linear: mean |x| per input channel over all calibration tokens, and a seeded sample of ``tokens``."""
    features: dict[str, tuple] = {}

    def hook(name: str):
        def record(_module: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            # drawn on the CPU whatever the device, so that every device samples the same tokens
            rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0), device="cpu")[:tokens]
            features[name] = (x.abs().mean(dim=0), x[rows.to(x.device)])
        return record

    handles = [linear.register_forward_hook(hook(name)) for name, linear in block_linears(block).items()]
    try:
        run_block(block, inputs, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return features


def _search_scale(
    block: nn.Module, names: list[str], x_mean: torch.Tensor, sample: torch.Tensor, config: QuantConfig
) -> torch.Tensor:
    """Grid search over alpha in [0, 1): s = mean|x|^alpha, minimising sum ||W x - Q(W s)(x / s)||^2.
    alpha = 0 (s = 1) is plain round-to-nearest, so the search never does worse than RTN on its sample."""
    weights = [block.get_submodule(n).weight.detach().float() for n in names]
    group_size, _ = effective_group_size(sample.shape[1], config.group_size)
    reference = [sample @ w.t() for w in weights]
    best_error, best_scale = float("inf"), torch.ones_like(x_mean)
    for step in range(config.alpha_grid):
        alpha = step / config.alpha_grid
        scale = x_mean.pow(alpha).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()  # centre the scales around 1
        error = sum(
            ((sample / scale) @ _fake_quantize(w * scale, config.bits, group_size, config.sym).t() - ref)
            .pow(2).sum().item()
            for w, ref in zip(weights, reference)
        )
        if error < best_error:
            best_error, best_scale = error, scale
    return best_scale


def _fold_scale(block: nn.Module, prev: str | None, names: list[str], scale: torch.Tensor) -> bool:
    """W <- W diag(s) for the group, and 1/s folded into ``prev`` where that is exact.
    Returns False when it is not (no ``prev``, or widths differ): the caller keeps s as an input scale."""
    for name in names:
        linear = block.get_submodule(name)
        linear.weight.mul_(scale.to(linear.weight.dtype))
    prev_module = block.get_submodule(prev) if prev else None
    if prev_module is None or (isinstance(prev_module, nn.Linear) and prev_module.out_features != scale.numel()):
        return False
    inverse = (1 / scale).to(prev_module.weight.dtype)
    prev_module.weight.mul_(inverse.unsqueeze(1) if isinstance(prev_module, nn.Linear) else inverse)
    if getattr(prev_module, "bias", None) is not None:
        prev_module.bias.mul_(inverse)
    return True


def _search_clip(
    weight: torch.Tensor, sample: torch.Tensor, bits: int, group_size: int, sym: bool, steps: int = 10
) -> tuple[torch.Tensor, float]:
    """AWQ's clipping search: per (row, group), the shrink of the weight range that minimises the group's
    output error on the sample. Returns the clipped weight and the mean chosen ratio."""
    rows, cols = weight.shape
    grouped = weight.view(rows, -1, group_size)
    x = sample[:512].view(-1, cols // group_size, group_size)
    reference = torch.einsum("rGg,tGg->rGt", grouped, x)
    absmax = grouped.abs().amax(dim=-1, keepdim=True)
    best_error = torch.full(absmax.shape, float("inf"), device=absmax.device)
    best_limit = absmax.clone()
    for step in range(steps):
        limit = absmax * (1 - step / (2 * steps))
        clipped = torch.maximum(torch.minimum(grouped, limit), -limit)
        approx = _fake_quantize(clipped.reshape(rows, cols), bits, group_size, sym).view_as(grouped)
        error = (torch.einsum("rGg,tGg->rGt", approx, x) - reference).pow(2).mean(dim=-1, keepdim=True)
        better = error < best_error
        best_error, best_limit = torch.where(better, error, best_error), torch.where(better, limit, best_limit)
    clipped = torch.maximum(torch.minimum(grouped, best_limit), -best_limit).reshape(rows, cols)
    return clipped, float((best_limit / absmax.clamp(min=1e-12)).mean())
