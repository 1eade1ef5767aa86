"""What every quantization method shares: the integer grid, the group-size fallback, the per-layer log,
and walking a model's decoder blocks with calibration activations."""
from __future__ import annotations

import abc
import contextlib
import ctypes
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from quant.config import QuantConfig
from quant.qlinear import QuantLinear

log = logging.getLogger("quant")


# ---- the integer grid (the "Quantizer" of the GPTQ reference code) -------------------------------------

def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero-point of the min/max grid for ``w`` [rows, cols]; both [rows, 1].

    The range always contains 0 (as in the GPTQ reference). The scale is rounded to fp16 first, because
    fp16 is what QuantLinear stores and codes must be chosen against the scale that will be used, and it
    is rounded up, so the grid still spans the range and no weight is clipped by more than half a step.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin[dead], xmax[dead] = -1.0, 1.0
    exact = ((xmax - xmin) / maxq).clamp(min=torch.finfo(torch.float16).tiny)
    half = exact.half()
    half = torch.where(half.float() < exact, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    scale = half.float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid: clamp(round(w / scale) + zero, 0, 2**bits - 1)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def effective_group_size(in_features: int, group_size: int | None) -> tuple[int, str | None]:
    """The group size a layer really uses, and why it differs from the requested one (None if it does not).

    Fallback for widths the group size does not divide (smollm2's 576 at g128): halve the group size
    until it divides, so groups stay contiguous, equal-sized and a power-of-two multiple that int4
    kernels accept (576 -> 64); if no even size >= 16 divides, fall back to one group per channel.
    """
    if group_size is None or group_size == in_features:
        return in_features, None
    if group_size > in_features:
        return in_features, f"in_features {in_features} < group size {group_size} -> per-channel"
    size = group_size
    while size >= 16 and in_features % size:
        size //= 2
    if size >= 16 and in_features % size == 0:
        return size, None if size == group_size else f"in_features {in_features} % {group_size} != 0 -> g{size}"
    return in_features, f"in_features {in_features} has no group size <= {group_size} -> per-channel"


def rtn_codes(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes [out, in], scales and zeros [out, in / group_size]."""
    rows, cols = weight.shape
    grouped = weight.float().reshape(rows * (cols // group_size), group_size)
    scale, zero = find_params(grouped, bits, sym)
    q = quantize(grouped, scale, zero, bits)
    return q.reshape(rows, cols), scale.reshape(rows, -1), zero.reshape(rows, -1)


# ---- the per-layer log ---------------------------------------------------------------------------------

@dataclasses.dataclass
class LayerRecord:
    """One quantized (or skipped) layer: what was asked, what was used, and what it cost."""

    name: str
    shape: tuple[int, int]
    bits: int | None
    group_size_requested: int | None
    group_size: int | None
    fallback: str | None
    seconds: float
    weight_error: float | None = None  # relative Frobenius error ||W - W_hat|| / ||W||
    output_error: float | None = None  # relative calibration output error ||WX - W_hat X|| / ||WX||
    damp_percent: float | None = None
    hessian_seconds: float | None = None  # GPTQ: accumulating the Hessian (0 for a linear that shares one)
    note: str | None = None


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def pack_layer(
    name: str,
    linear: nn.Linear,
    config: QuantConfig,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    started: float,
    input_scale: torch.Tensor | None = None,
    **record: Any,
) -> tuple[QuantLinear, LayerRecord]:
    """Pack codes into a QuantLinear and log the layer's weight error against the original weight."""
    qlayer = QuantLinear.from_quantized(
        q, scales, zeros, config.bits, group_size, config.sym,
        None if linear.bias is None else linear.bias.detach(), input_scale,
    )
    weight = linear.weight.detach().float()
    error = (qlayer.dequantize() - weight).norm() / weight.norm().clamp(min=1e-12)
    requested = config.group_size
    fallback = effective_group_size(linear.in_features, requested)[1]
    entry = LayerRecord(
        name, tuple(weight.shape), config.bits, requested, group_size, fallback,
        time.perf_counter() - started, weight_error=float(error), **record,
    )
    return qlayer, entry


@torch.no_grad()
def rtn_layer(model: nn.Module, name: str, linear: nn.Linear, config: QuantConfig, **record: Any) -> LayerRecord:
    """Round-to-nearest of one linear at ``config``'s bits and group size (with the group-size fallback), packed
    into a QuantLinear in its place; its log record."""
    started = time.perf_counter()
    group_size, _ = effective_group_size(linear.in_features, config.group_size)
    q, scales, zeros = rtn_codes(linear.weight, config.bits, group_size, config.sym)
    qlayer, entry = pack_layer(name, linear, config, q, scales, zeros, group_size, started, **record)
    replace_module(model, name, qlayer)
    return entry


def output_projection(model: nn.Module) -> tuple[str, nn.Module]:
    """The name and module of the model's output projection (lm_head)."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head), head


def untie_output(model: nn.Module) -> None:
    """The output projection no longer shares the input embeddings' weight: keep transformers from tying them
    again (``tie_weights`` would set a ``weight`` on the quantized layer)."""
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def quantize_lm_head(model: nn.Module, config: QuantConfig) -> LayerRecord | None:
    """RTN of the output projection onto its own grid when ``config.lm_head_bits`` is set (whatever the blocks'
    method: llama.cpp rounds its output matrix the same way); the input embeddings stay as they are."""
    if config.lm_head_bits is None:
        return None
    name, head = output_projection(model)
    head_config = dataclasses.replace(config, bits=config.lm_head_bits, group_size=config.lm_head_group_size)
    record = rtn_layer(model, name, head, head_config, note="output projection (RTN)")
    untie_output(model)
    return record


# ---- the interface ---------------------------------------------------------------------------------------

class Quantizer(abc.ABC):
    """One quantization method. ``quantize`` replaces the model's decoder-block linears in place."""

    name: str
    needs_calibration: bool = False

    @abc.abstractmethod
    def quantize(
        self, model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None
    ) -> list[LayerRecord]:
        """Quantize ``model`` in place; ``calibration`` is token ids [samples, tokens] where needed."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks (LLaMA, Qwen2, Phi, ... all keep them at ``model.model.layers``)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__}: no decoder blocks found at model.layers / transformer.h")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def quantizable_layers(model: nn.Module, config: QuantConfig) -> Iterator[tuple[str, nn.Linear, QuantConfig | None]]:
    """(full name, linear, layer config or None for a layer kept in full precision) per block linear."""
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    for index, block in enumerate(blocks):
        for name, linear in block_linears(block).items():
            full_name = f"{prefix}.{index}.{name}"
            yield full_name, linear, config.for_layer(full_name)


def skipped_record(name: str, linear: nn.Linear, config: QuantConfig) -> LayerRecord:
    return LayerRecord(
        name, tuple(linear.weight.shape), None, config.group_size, None, None, 0.0,
        note="kept in full precision by layer_overrides",
    )


# ---- sequential calibration over blocks (shared by GPTQ and GSQ) -----------------------------------------

class StopForward(Exception):
    """Raised by a hook to end a forward once it has what it came for."""


@dataclasses.dataclass
class BlockStep:
    """One decoder block with its calibration inputs. A method that runs the block itself while quantizing
    it (GPTQ) sets ``outputs``; otherwise the walk runs the quantized block to get them."""

    name: str
    block: nn.Module
    inputs: torch.Tensor  # hidden states entering the block, [samples, tokens, hidden]
    kwargs: dict[str, Any]  # what the model passes every block: rotary embeddings, mask, ...
    chunk: int  # calibration samples per forward of the block
    outputs: torch.Tensor | None = None

    def chunks(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        return calibration_chunks(self.inputs, self.kwargs, self.chunk)


def calibration_chunks(inputs: torch.Tensor, kwargs: dict[str, Any], chunk: int
                       ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The block's calibration inputs in forwards of ``chunk`` samples, which bounds the activations a forward
    holds at once (a 1B model's MLP at 128 x 512 tokens: 2 GB per tensor). Keyword tensors with one row per
    sample (an eager attention mask, [samples, 1, tokens, tokens]) are cut with the inputs; broadcast ones
    (rotary embeddings, [1, tokens, dim]) are passed whole."""
    samples = inputs.shape[0]

    def cut(value: Any, start: int, stop: int) -> Any:
        sliceable = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == samples
        return value[start:stop] if sliceable else value

    return [(inputs[start:start + chunk], {key: cut(value, start, start + chunk) for key, value in kwargs.items()})
            for start in range(0, samples, chunk)]


@torch.no_grad()
def block_inputs(model: nn.Module, calibration: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering the first block for the whole calibration set, and the block keyword arguments.
    Only the embeddings run here, so the whole set goes in one batch; the blocks then run it in chunks."""
    captured: dict[str, Any] = {}

    def capture(_module: nn.Module, args: tuple, block_kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else block_kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in block_kwargs.items() if k not in ("past_key_values", "past_key_value")}
        raise StopForward

    handle = decoder_blocks(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(calibration.to(next(model.parameters()).device), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured["hidden"], {**captured["kwargs"], "use_cache": False}


def sequential_blocks(
    model: nn.Module, calibration: torch.Tensor | None, method: str, chunk: int | None = None
) -> Iterator[BlockStep]:
    """Walk the decoder blocks in order with their calibration inputs; once the caller has quantized a block,
    the next block's inputs are this block's outputs, so every block calibrates on what the already-quantized
    model feeds it. Blocks run on ``chunk`` samples per forward (None: the whole set at once)."""
    if calibration is None:
        raise ValueError(f"{method} needs calibration token ids [samples, tokens]")
    chunk = min(chunk or calibration.shape[0], calibration.shape[0])
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    with reused_heap():
        inputs, kwargs = block_inputs(model, calibration)
        for index, block in enumerate(blocks):
            started = time.perf_counter()
            step = BlockStep(f"{prefix}.{index}", block, inputs, kwargs, chunk)
            yield step
            inputs = step.outputs if step.outputs is not None else run_block(block, step.chunks())
            log.info("%s: block %d/%d done in %.1fs", method, index + 1, len(blocks), time.perf_counter() - started)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """Keep freed memory in the process while the calibration walk passes its activations from op to op.

    glibc serves every allocation over 32 MiB with a fresh mmap and unmaps it when freed; the walk's activations
    are 40-400 MB each, so every op faulted its output in from zeroed kernel pages, and GPTQ spent a fifth of its
    time in the kernel on 2 cores (see README, Known limits). Inside this context large blocks come from the heap
    and freed ones are reused; on leaving it the heap is trimmed back to the system. Not glibc: no change.

    Reuse is not exact: torch asks for 64-byte aligned blocks, which glibc 2.36 pads, so a freed block that
    small allocations pin in place cannot serve a request of its own size and a few blocks still come fresh.
    On a 32 x 512 GPTQ build with torch's default CPU kernels: 0.8 M page faults instead of 7.1 M, 4.7 s of
    system time instead of 19.2 s, peak RSS 2283 MB instead of 2179 MB."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


@torch.no_grad()
def run_block(block: nn.Module, chunks: list[tuple[torch.Tensor, dict[str, Any]]]) -> torch.Tensor:
    """The block's output hidden states for the calibration set, one forward per chunk."""
    return torch.cat([block_output(block(inputs, **kwargs)) for inputs, kwargs in chunks])


def block_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
