"""Layer-wise sensitivity (the reference study's future work): quantize one decoder linear at a time by RTN, every
other layer in full precision, and measure the full-vocabulary KL divergence to the baseline on the WikiText
windows. The ranking says where bits matter; ``mixed_precision_overrides`` turns it into a config that keeps the
most sensitive linears at 8 bits within a byte budget, to be evaluated like any other row of the matrix.

Each layer's result is cached on its own (resumable: an interrupted run starts where it stopped). A linear in
block b changes nothing before block b, so the hidden states entering every block are computed once for the
baseline and each layer's forward starts at its own block.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.cache import cached_json, code_of, definition_code
from quant.config import ConfigError, QuantConfig
from quant.figures import pyplot, save
from quant.methods.base import decoder_blocks, dequantize, effective_group_size, quantizable_layers, rtn_codes
from quant.models import ModelSpec, model_key
from quant.pipeline import CALIBRATION_SOURCE, Workbench
from quant.qlinear import packed_bytes
from quant.snapshots import fingerprint
from quant.kinds.perplexity import full_kld, perplexity_windows

log = logging.getLogger("quant")


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    name: str  # e.g. model.layers.3.mlp.down_proj
    block: int
    linear: str  # the name inside the block, e.g. mlp.down_proj
    shape: tuple[int, int]
    mean_kld: float  # KL(baseline || model with only this linear quantized), per token, full vocabulary
    same_top_p: float


class _Replay(nn.Module):
    """Stands in for the blocks before the one under test: the first returns the baseline's hidden states entering
    that block, the others pass them on."""

    def __init__(self, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


@contextlib.contextmanager
def _starting_at(model: nn.Module, block: int, hidden: torch.Tensor) -> Iterator[None]:
    blocks = decoder_blocks(model)
    kept = list(blocks[:block])
    for index in range(block):
        blocks[index] = _Replay(hidden if index == 0 else None)
    try:
        yield
    finally:
        for index, module in enumerate(kept):
            blocks[index] = module


@torch.no_grad()
def _baseline_pass(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward of the baseline on ``ids``: the hidden states entering each decoder block, and the next-token
    log-probabilities."""
    inputs: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(
        lambda _m, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        for block in decoder_blocks(model)]
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, _next_token_logprobs(logits)


def _next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float()[:, :-1], -1)


@torch.no_grad()
def _rtn_weight(linear: nn.Linear, config: QuantConfig) -> torch.Tensor:
    """The linear's weight after RTN at the config's bits and group size (with the usual group-size fallback)."""
    group_size, _ = effective_group_size(linear.in_features, config.group_size)
    q, scales, zeros = rtn_codes(linear.weight, config.bits, group_size, config.sym)
    rows, cols = q.shape
    grouped = dequantize(q.view(rows, -1, group_size), scales.unsqueeze(-1), zeros.unsqueeze(-1))
    return grouped.reshape(rows, cols).to(linear.weight.dtype)


def evaluation_windows(workbench: Workbench, spec: ModelSpec, windows: int) -> torch.Tensor:
    """The first ``windows`` WikiText windows, as the perplexity task scores them ([windows, window] ids)."""
    _, tokenizer = workbench.baseline(spec)
    text = workbench.items(spec, CALIBRATION_SOURCE)[0]["text"]
    window = workbench.settings.matrix.tasks[CALIBRATION_SOURCE]["window"]
    return torch.stack(perplexity_windows(tokenizer, text, window)[:windows])


def layer_sensitivity(workbench: Workbench, spec: ModelSpec, quant_name: str, windows: int) -> list[LayerSensitivity]:
    """Every decoder linear of ``spec`` quantized alone by RTN with the config ``quant_name``, in model order, on
    the first ``windows`` WikiText windows; each layer's figures cached on their own."""
    config = workbench.settings.matrix.quant[quant_name]
    if config.method != "rtn":
        raise ConfigError(f"{workbench.settings.matrix.path} quant.{quant_name}: layer-wise sensitivity quantizes one linear "
                          f"at a time by RTN; name an rtn config (this one is {config.method})")
    model, _ = workbench.baseline(spec)
    device = workbench.device_for(spec)
    ids = evaluation_windows(workbench, spec, windows).to(device)
    parts = {"model": model_key(spec), "quant": config.to_dict(), "windows": fingerprint(ids.tolist()),
             "device": device, "code": sensitivity_code()}
    return measure_layers(model, ids, config,
                          lambda name, compute: cached_json("sensitivity", {**parts, "layer": name}, compute))


def sensitivity_code() -> str:
    """The code that makes a layer's figures: ``measure_layers`` and what it calls in the methods, the perplexity
    kind and the quantized layers (the ranking's report and heatmap are not in it)."""
    return code_of("quant.methods.base", "quant.kinds.perplexity", "quant.qlinear") + definition_code(measure_layers)


Store = Callable[[str, Callable[[], dict[str, float]]], dict[str, float]]  # (layer name, compute) -> figures


@torch.no_grad()
def measure_layers(model: nn.Module, ids: torch.Tensor, config: QuantConfig,
                   store: Store = lambda _name, compute: compute()) -> list[LayerSensitivity]:
    """Each decoder linear of ``model`` quantized alone by RTN with ``config``: KL(baseline || that model) per token
    over the full vocabulary, and the same-top-token rate, on ``ids`` [windows, tokens]. ``store`` may return a
    layer's figures without computing them (a cache)."""
    blocks = decoder_blocks(model)
    prefix = next(path for path, module in model.named_modules() if module is blocks)
    layers = list(quantizable_layers(model, config))
    state: dict[str, Any] = {}

    def baseline_pass() -> None:  # only once some layer is not stored yet
        if not state:
            state["inputs"], state["base"] = _baseline_pass(model, ids)

    results, started = [], time.perf_counter()
    for number, (name, linear, _) in enumerate(layers, start=1):
        block, inner = name.removeprefix(prefix + ".").split(".", 1)  # model.layers.3.mlp.down_proj -> 3, mlp.down_proj

        def compute() -> dict[str, float]:
            baseline_pass()
            original = linear.weight.data
            linear.weight.data = _rtn_weight(linear, config)
            try:
                with _starting_at(model, int(block), state["inputs"][int(block)]):
                    logprobs = _next_token_logprobs(model(ids, use_cache=False).logits)
            finally:
                linear.weight.data = original
            return {"mean_kld": float(full_kld(state["base"], logprobs).mean()),
                    "same_top_p": float((state["base"].argmax(-1) == logprobs.argmax(-1)).float().mean())}

        figures = store(name, compute)
        results.append(LayerSensitivity(name, int(block), inner, tuple(linear.weight.shape), **figures))
        log.info("sensitivity %d/%d %s: mean KLD %.5f (%.0f s so far)", number, len(layers), name,
                 figures["mean_kld"], time.perf_counter() - started)
    return results


def mixed_precision_overrides(ranking: list[LayerSensitivity], config: QuantConfig, budget: float,
                              bits: int = 8) -> dict[str, dict[str, Any]]:
    """``layer_overrides`` keeping the most sensitive linears at ``bits`` per channel, most sensitive first,
    while the stored bytes of the quantized linears grow by at most ``budget`` (0.10: 10%) over ``config``."""
    def layer_bytes(shape: tuple[int, int], layer_bits: int, group_size: int | None) -> int:
        out_features, in_features = shape
        return packed_bytes(out_features, in_features, layer_bits, effective_group_size(in_features, group_size)[0],
                            config.sym)

    uniform = sum(layer_bytes(r.shape, config.bits, config.group_size) for r in ranking)
    extra, overrides = 0.0, {}
    for row in sorted(ranking, key=lambda r: r.mean_kld, reverse=True):
        cost = layer_bytes(row.shape, bits, None) - layer_bytes(row.shape, config.bits, config.group_size)
        if extra + cost <= budget * uniform:
            extra += cost
            overrides[row.name] = {"bits": bits, "group_size": None}
    return overrides


def heatmap(ranking: list[LayerSensitivity], title: str, path: Path) -> Path:
    """Blocks down, linear types across, colour the log10 of the mean KLD."""
    linears = list(dict.fromkeys(r.linear for r in ranking))
    blocks = sorted({r.block for r in ranking})
    grid = [[math.nan] * len(linears) for _ in blocks]
    for row in ranking:
        grid[blocks.index(row.block)][linears.index(row.linear)] = math.log10(max(row.mean_kld, 1e-12))
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(1.1 * len(linears) + 2, 0.25 * len(blocks) + 1.5))
    image = axis.imshow(grid, aspect="auto", cmap="viridis")
    axis.set_xticks(range(len(linears)), linears, rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    axis.set_ylabel("block")
    figure.colorbar(image, ax=axis, label="log10 mean KLD (this linear alone quantized)")
    return save(figure, title, path)
