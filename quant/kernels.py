"""Fast paths for packed 4- and 8-bit layers: torch's own weight-only matmuls, behind the QuantLinear interface.

QuantLinear (dequantize in forward) is the correctness reference and the storage format; ``use_fast_kernels``
swaps each layer that a kernel supports for an ``Int4Linear`` holding the same codes in the kernel's tiled
layout, and leaves the rest on the reference with the reason. The kernels compute ``(q - 8) * scale + zero``
per group, so a zero-point ``z`` becomes the float offset ``(8 - z) * scale`` (0 for the symmetric grid).

- CPU: ``aten._weight_int4pack_mm_for_cpu`` (torch's int4 GEMM) with bf16 activations: measured here (2 cores,
  1536x576, group 64) 0.075 ms at one token against 0.154 ms for the fp32 dense matmul; its fp32-activation
  variant is a slow fallback (1.05 ms), so activations are cast to bf16 around it and back.
- CUDA: ``aten._weight_int4pack_mm`` (tinygemm, the kernel behind torchao's int4 weight-only layout; bf16).
- 8-bit per-channel symmetric layers (``rtn-w8``, an 8-bit ``lm_head``): ``Int8Linear``, an int8 weight and one
  scale per channel; ``aten._weight_int8pack_mm`` on the CPU, a matmul that torch.compile fuses with the
  dequantization on CUDA.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from quant.methods.base import replace_module
from quant.qlinear import QuantLinear

KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def inner_k_tiles(in_features: int) -> int | None:
    """The widest tiling of the input dimension (16 x 8, 4 or 2 columns) that divides it."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), None)


ACTIVATION_DTYPE = torch.bfloat16  # what both kernels are fast at; scales and offsets are stored in it too


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One device's int4 matmul: how to tile [out, in] int32 codes for it, and the op itself."""

    name: str
    pack: Callable[[torch.Tensor, int], torch.Tensor]  # (codes, inner k tiles) -> tiled codes
    matmul: Callable[..., torch.Tensor]  # (x, tiled codes, group size, scales and zeros) -> x W^T


KERNELS = {
    "cpu": Kernel("aten._weight_int4pack_mm_for_cpu (bf16 activations)",
                  torch.ops.aten._convert_weight_to_int4pack_for_cpu, torch.ops.aten._weight_int4pack_mm_for_cpu),
    # tinygemm takes the codes two per byte, high nibble first
    "cuda": Kernel("aten._weight_int4pack_mm (tinygemm, CUDA, bf16 activations)",
                   lambda codes, tiles: torch.ops.aten._convert_weight_to_int4pack(
                       (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), tiles),
                   torch.ops.aten._weight_int4pack_mm),
}


def unsupported_reason(layer: QuantLinear) -> str | None:
    """Why a layer must stay on the reference path, or None when the int4 or int8 kernels take it."""
    if layer.bits == 8:
        if layer.group_size != layer.in_features or not layer.sym:
            return "8-bit codes in groups or asymmetric (the int8 kernel is per-channel symmetric)"
        return None
    if layer.bits != 4:
        return f"{layer.bits}-bit codes (the kernels are 4- and 8-bit)"
    if layer.group_size not in KERNEL_GROUP_SIZES:
        return f"group size {layer.group_size} (the kernels take {'/'.join(map(str, KERNEL_GROUP_SIZES))})"
    if inner_k_tiles(layer.in_features) is None or layer.out_features % 16:
        return f"shape {layer.out_features}x{layer.in_features} does not tile"
    return None


def kernel_for(device: torch.device) -> Kernel:
    """The int4 kernel for tensors on ``device``, or an error naming the devices that have one."""
    try:
        return KERNELS[device.type]
    except KeyError:
        raise ValueError(f"no int4 kernel for device {device.type!r}; kernels exist for {sorted(KERNELS)}") from None


class WeightOnlyLinear(nn.Module):
    """What the fast layers share: the QuantLinear's bias and input scale kept as they are, and bf16 activations
    into the kernel (``_matmul``, [tokens, in] -> [tokens, out]) and back to the caller's dtype."""

    bits: int

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        reason = unsupported_reason(layer) or (None if layer.bits == self.bits else f"{layer.bits}-bit codes")
        if reason:
            raise ValueError(f"{type(self).__name__} cannot take this layer: {reason}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        self.register_buffer("input_scale", None if layer.input_scale is None else layer.input_scale.clone())

    @property
    def kernel(self) -> str:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        out = self._matmul(x.to(ACTIVATION_DTYPE).contiguous())
        out = out.to(dtype).reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(dtype)


class Int4Linear(WeightOnlyLinear):
    """A 4-bit QuantLinear repacked for torch's int4 weight-only matmul. The kernel is chosen at every call from
    the device the packed codes are on; each device's kernel tiles the codes its own way, so moving the layer
    to another device type re-tiles them (``_apply``)."""

    bits = 4

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        device = layer.qweight.device
        self.group_size = layer.group_size
        scales = layer.scales.float()
        offsets = (8 - layer.zeros().to(device)) * scales
        # [n_groups, out, 2]: the kernels read a group's scale and offset as one word
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales, offsets], -1).transpose(0, 1).contiguous().to(ACTIVATION_DTYPE))
        self.register_buffer("packed", self._pack(layer.codes().to(torch.int32)))

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return kernel_for(codes.device).pack(codes, inner_k_tiles(self.in_features))

    def codes(self) -> torch.Tensor:
        """The [out, in] int32 codes, read back through the kernel itself: with the identity as activations, unit
        scales and zero offsets it returns W^T = q - 8 exactly (small integers are exact in bf16)."""
        eye = torch.eye(self.in_features, dtype=ACTIVATION_DTYPE, device=self.packed.device)
        unit = torch.zeros_like(self.scales_and_zeros)
        unit[..., 0] = 1
        weight = kernel_for(self.packed.device).matmul(eye, self.packed, self.group_size, unit)
        return (weight.t().float() + 8).to(torch.int32)

    def _apply(self, fn, recurse=True):
        # ``fn`` is what .to() / .cuda() / .cpu() apply to each tensor; an integer probe shows where it sends
        # them without touching the codes. A move to another device type re-tiles the codes for its kernel.
        source = self.packed.device
        target = fn(torch.empty(0, dtype=torch.int32, device=source)).device
        if target.type == source.type:
            return super()._apply(fn, recurse)
        codes = self.codes()
        super()._apply(fn, recurse)
        self.packed = self._pack(codes.to(target))
        return self

    @property
    def kernel(self) -> str:
        return kernel_for(self.packed.device).name

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernel_for(self.packed.device).matmul(x, self.packed, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, weight, scales)
    # no int8 weight-only matmul in torch for CUDA: eager this dequantizes the weight first; torch.compile fuses
    # the cast and the scale into the matmul, which then reads the int8 weight once
    return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales


INT8_KERNELS = {"cpu": "aten._weight_int8pack_mm (bf16 activations)",
                "cuda": "int8 weight x bf16 (dequantized in the matmul; fused under torch.compile)"}


class Int8Linear(WeightOnlyLinear):
    """A per-channel symmetric 8-bit QuantLinear as an int8 weight (the codes minus the grid's zero, 128) and one
    scale per output channel, for torch's int8 weight-only matmul."""

    bits = 8

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        self.register_buffer("weight", (layer.codes().to(torch.int16) - 128).to(torch.int8))
        self.register_buffer("scales", layer.scales.reshape(-1).to(ACTIVATION_DTYPE))

    @property
    def kernel(self) -> str:
        return INT8_KERNELS.get(self.weight.device.type, f"int8 weight x bf16 on {self.weight.device.type}")

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_matmul(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@dataclasses.dataclass
class KernelPlan:
    """Which kernel runs the model's quantized layers, for the report beside every timing."""

    kernel: str
    fast_layers: int
    reference_layers: Counter  # reason -> count

    def describe(self) -> str:
        if not self.fast_layers and not self.reference_layers:
            return "dense (no quantized layers)"
        text = f"{self.kernel} ({self.fast_layers} layers; the rest bf16)" if self.fast_layers else ""
        rest = ", ".join(f"{n} on the dequantizing reference: {reason}" for reason, n in self.reference_layers.items())
        return "; ".join(part for part in (text, rest) if part)


def use_fast_kernels(model: nn.Module) -> KernelPlan:
    """Replace, in place, every QuantLinear a fast kernel supports (4-bit: Int4Linear; 8-bit per-channel
    symmetric: Int8Linear); the others stay on the reference.

    The kernels take bf16 activations, so the rest of the model (embeddings, norms, a tied lm_head) is cast to
    bf16 as well: otherwise the fp32 lm_head alone reads more bytes per token than all the int4 layers. Layers
    left on the reference keep their own fp16 scales; buffers stay as they are (``cast_parameters``)."""
    kernels: set[str] = set()
    fast, reference = 0, Counter()
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        reason = unsupported_reason(module)
        if reason:
            reference[reason] += 1
            continue
        fast_layer = Int8Linear(module) if module.bits == 8 else Int4Linear(module)
        replace_module(model, name, fast_layer)
        kernels.add(fast_layer.kernel)
        fast += 1
    if fast:
        cast_parameters(model, ACTIVATION_DTYPE)
    return KernelPlan(" + ".join(sorted(kernels)), fast, reference)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters only, as loading a checkpoint in ``dtype`` would: buffers such as RoPE's inverse
    frequencies stay fp32, and quantized layers (codes and scales are buffers) keep their own formats."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model
