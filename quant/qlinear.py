"""Packed low-bit linear layers: storage, exact (de)packing, and a dequantize-in-forward reference.

Weights are stored as unsigned b-bit integers ``q`` packed along the input dimension, with one fp16
scale (and, for asymmetric grids, one packed b-bit zero-point) per (output row, group of input
columns); the real weight is ``(q - zero) * scale``. Symmetric grids use the fixed zero
``2**(bits-1)`` and store none, which is what keeps a 4-bit g128 layer near 4.125 bits per weight.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers along the last dimension into uint8, losslessly."""
    values = values.to(torch.uint8)
    if 8 % bits == 0:
        # 2, 4 and 8 bits: whole values per byte, so a shift-and-or per slot (fast, no temporaries).
        per_byte = 8 // bits
        pad = (-values.shape[-1]) % per_byte
        values = nn.functional.pad(values, (0, pad)).view(*values.shape[:-1], -1, per_byte)
        packed = torch.zeros(values.shape[:-1], dtype=torch.uint8, device=values.device)
        for slot in range(per_byte):
            packed |= values[..., slot] << (slot * bits)
        return packed
    # 3, 5, 6, 7 bits straddle byte boundaries: write the values as a little-endian bit stream.
    shifts = torch.arange(bits, device=values.device, dtype=torch.uint8)
    stream = ((values.unsqueeze(-1) >> shifts) & 1).flatten(-2)
    stream = nn.functional.pad(stream, (0, (-stream.shape[-1]) % 8)).view(*stream.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, device=values.device, dtype=torch.int32)).to(torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values of each row, as uint8."""
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        slots = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
        return torch.stack(slots, dim=-1).flatten(-2)[..., :count]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : count * bits]
    stream = stream.reshape(*packed.shape[:-1], count, bits).to(torch.int32)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)


def packed_bytes(out_features: int, in_features: int, bits: int, group_size: int, sym: bool) -> int:
    """Bytes of a QuantLinear's codes, fp16 scales and (asymmetric) packed zero-points; its bias aside."""
    groups = in_features // group_size
    zeros = 0 if sym else out_features * ((groups * bits + 7) // 8)
    return out_features * ((in_features * bits + 7) // 8) + out_features * groups * 2 + zeros


class QuantLinear(nn.Module):
    """A linear layer whose weight lives packed; ``forward`` dequantizes (the correctness reference)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool = False,
        input_scale: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, (in_features * bits + 7) // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer(
            "qzeros", None if sym else torch.zeros(out_features, (n_groups * bits + 7) // 8, dtype=torch.uint8, device=device)
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        # Activation-aware methods that cannot fold their per-channel scale into a preceding layer keep
        # it here: forward computes W' (x / s) with W' = W * s quantized.
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16, device=device) if input_scale else None)
        self._dequantized: torch.Tensor | None = None  # set only inside ``dequantized_weights``

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        sym: bool,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Build from integer codes ``q`` [out, in], and per-group ``scales``/``zeros`` [out, in/group_size], on
        the device of ``q``."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bits, group_size, sym, bias is not None, input_scale is not None,
                    q.device)
        layer.qweight.copy_(pack_bits(q, bits))
        layer.scales.copy_(scales.to(torch.float16))
        if not sym:
            layer.qzeros.copy_(pack_bits(zeros.round().clamp(0, 2**bits - 1), bits))
        if bias is not None:
            layer.bias.copy_(bias)
        if input_scale is not None:
            layer.input_scale.copy_(input_scale)
        return layer

    def codes(self) -> torch.Tensor:
        """The integer codes, [out, in]."""
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Per-group zero-points, [out, n_groups], as float."""
        n_groups = self.scales.shape[1]
        if self.sym:
            return torch.full((self.out_features, n_groups), 2 ** (self.bits - 1), device=self.scales.device)
        return unpack_bits(self.qzeros, self.bits, n_groups).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real-valued weight ``(q - zero) * scale`` [out, in] (input scale already divided out)."""
        q = self.codes().float().view(self.out_features, -1, self.group_size)
        weight = (q - self.zeros().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        weight = weight.view(self.out_features, self.in_features)
        if self.input_scale is not None:
            weight = weight / self.input_scale.float()
        return weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self._dequantized if self._dequantized is not None else self.dequantize(x.dtype)
        return nn.functional.linear(x, weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}"
        )


@contextlib.contextmanager
def dequantized_weights(model: nn.Module) -> Iterator[None]:
    """Dequantize every QuantLinear once for the duration, instead of once per forward call.

    Outputs are bit-identical to the per-call reference (the same ``dequantize``); only time and memory
    differ. Accuracy evaluation uses it, so that a long generation does not re-dequantize every weight at
    every token; memory and latency are measured outside it, on the packed model.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dtype = next((p.dtype for p in model.parameters()), torch.float32)  # the model's compute dtype
    try:
        for layer in layers:
            layer._dequantized = layer.dequantize(dtype)
        yield
    finally:
        for layer in layers:
            layer._dequantized = None


def model_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, each storage counted once (tied weights share)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
