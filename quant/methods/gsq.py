"""GSQ: activation-aware group scaling (AWQ, Lin et al., 2024), the method of the reference study.

Input channels that see large activations are salient: scaling their weights up by s (and the activation
down by 1/s) before round-to-nearest quantization shrinks their relative rounding error. Per block and per
scaling group (layers that share one input), search s = mean|x|^alpha over a grid of alpha for the value
that minimises the group's output error on calibration activations, fold 1/s into the operation that
produces the input (a norm, or a linear on a linear path); where an activation sits between, keep it as an
explicit input scale (AWQ's ScaledActivation), and where the widths differ (grouped-query v -> o) leave the
group unscaled as AWQ does (or, with ``explicit_scales``, keep an explicit scale there too); then quantize in
groups. Optionally search a per-group clipping ratio of the weight range as well.
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
    rtn_codes, sequential_blocks, skipped_record,
)

log = logging.getLogger("quant")


class ScalingGroup(NamedTuple):
    """Linears that read the same input, and the module producing that input (None: not foldable)."""

    prev: str | None
    linears: tuple[str, ...]


# Per-architecture table (config.model_type -> groups), as AWQ groups layers; a new architecture is an entry.
# v_proj -> o_proj folds only when v_proj's output width equals o_proj's input (no grouped-query attention);
# otherwise it is left unscaled. Phi's fc1 -> fc2 passes through GELU, so its scale stays explicit.
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
        for step in sequential_blocks(model, calibration, self.name, config.calib_chunk):
            block_name, block = step.name, step.block
            layer_configs = {
                name: config.for_layer(f"{block_name}.{name}") for name in block_linears(block)
            }
            # Inputs of every linear, captured once before any scaling: folding is exact, so a group's
            # input changes only by its own 1/s, which the search accounts for.
            features = _linear_inputs(block, step.chunks(), config.search_tokens)
            group_scales: dict[str, torch.Tensor] = {}  # every scaled linear's s: its weight is now W diag(s)
            explicit_scales: dict[str, torch.Tensor] = {}  # ... and those whose input is divided by s explicitly
            for group in SCALING_GROUPS[model_type]:
                names = [n for n in group.linears if layer_configs[n] is not None]
                fold = foldable(block, group, names)
                if not names or (fold is False and not config.explicit_scales):
                    continue  # AWQ leaves a group it cannot fold unscaled (v->o under grouped-query attention)
                x_mean, sample = features[names[0]]
                scale = _search_scale(block, names, x_mean, sample, layer_configs[names[0]])
                group_scales.update({name: scale for name in names})
                scale_group(block, group, names, scale, fold)
                if not fold:
                    explicit_scales.update({name: scale for name in names})
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
                if layer_config.clip_search:  # on the inputs the scaled weight now sees: x / s, folded or not
                    sample = features[name][1] / group_scales.get(name, 1.0)
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


def _linear_inputs(block: nn.Module, chunks: list[tuple[torch.Tensor, dict]], tokens: int) -> dict[str, tuple]:
    """Per linear: mean |x| per input channel over all calibration tokens, and a seeded sample of ``tokens``.
    For the same inputs both come out the same bits however the set is chunked: |x| is summed sample by sample, and
    the sample's rows are drawn over the whole set and gathered from the chunk that holds each."""
    total = sum(inputs.shape[0] * inputs.shape[1] for inputs, _ in chunks)
    # drawn on the CPU whatever the device, so that every device samples the same tokens
    rows = torch.randperm(total, generator=torch.Generator().manual_seed(0), device="cpu")[:tokens]
    rows = rows.to(chunks[0][0].device)
    sums: dict[str, torch.Tensor] = {}
    picked: dict[str, torch.Tensor] = {}
    seen = 0  # tokens of the chunks before this one

    def hook(name: str):
        def record(_module: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
            x = inp[0].float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], device=x.device)
                picked[name] = torch.zeros(len(rows), x.shape[-1], device=x.device)
            for sample in x:
                sums[name] += sample.abs().sum(dim=0)
            flat = x.reshape(-1, x.shape[-1])
            here = (rows >= seen) & (rows < seen + len(flat))
            picked[name][here] = flat[rows[here] - seen]
        return record

    handles = [linear.register_forward_hook(hook(name)) for name, linear in block_linears(block).items()]
    try:
        for inputs, kwargs in chunks:
            block(inputs, **kwargs)
            seen += inputs.shape[0] * inputs.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / total, picked[name]) for name in sums}


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


def foldable(block: nn.Module, group: ScalingGroup, names: list[str]) -> bool | None:
    """Whether 1/s folds exactly into the module producing the group's input: True; False when it cannot (a linear
    of another width: grouped-query v->o); None when there is none to fold into (an activation: Phi's fc1 -> GELU
    -> fc2), where AWQ divides the input explicitly (its ScaledActivation). A group with a linear kept in full
    precision never folds: that linear would read x / s with its weight unscaled."""
    if group.prev is None:
        return None
    prev = block.get_submodule(group.prev)
    if len(names) < len(group.linears):
        return None
    return not (isinstance(prev, nn.Linear) and prev.out_features != block.get_submodule(names[0]).in_features)


def scale_group(
    block: nn.Module, group: ScalingGroup, names: list[str], scale: torch.Tensor, fold: bool | None
) -> None:
    """W <- W diag(s) for the group's linears ``names``, and 1/s folded into the module producing their input when
    ``fold`` (``foldable``); if not, the caller divides their input by s."""
    for name in names:
        linear = block.get_submodule(name)
        linear.weight.mul_(scale.to(linear.weight.dtype))
    if fold:
        _divide_output(block.get_submodule(group.prev), scale)


def _divide_output(module: nn.Module, scale: torch.Tensor) -> None:
    """The module's output divided by s: a norm's weight (and bias), or a linear's rows."""
    inverse = (1 / scale).to(module.weight.dtype)
    module.weight.mul_(inverse.unsqueeze(1) if isinstance(module, nn.Linear) else inverse)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(inverse)


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
