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
- Prefill: the weight-only kernels are built for a few rows (decode). A call with many rows (a prompt, a batch of
  scored sequences) can be faster as the layer's weight dequantized once per call and a dense GEMM; whether, from
  how many rows and in which dtype is measured once per process on this machine (``prefill_route``), because the
  fastest dense dtype depends on the CPU (bf16 GEMMs on AMX, fp32 elsewhere). A compiled forward skips the route:
  inductor, autotuning, has weight-only GEMM templates of its own (on AMX as fast as bf16 at 512 rows).
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from quant.methods.base import replace_module
from quant.qlinear import QuantLinear

KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def inner_k_tiles(in_features: int) -> int | None:
    """The widest tiling of the input dimension (16 x 8, 4 or 2 columns) that divides it."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), None)


ACTIVATION_DTYPE = torch.bfloat16  # what both kernels are fast at; scales and offsets are stored in it too


# Rows per block of the CPU kernel's packing: 64 where ATen runs its AVX-512 code, 32 on AVX2 and below.
CPU_PACK_BLOCKS = (64, 32)


def _unpack_cpu(packed: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
    """The [out, in] uint8 codes from the CPU kernel's packing: blocks of ``block`` output rows, each input column
    of a block in block / 2 bytes, byte r holding row r's code (low nibble) and row r + block / 2's (high)."""
    bytes_ = packed.view(out_features // block, in_features, block // 2)
    return torch.cat([bytes_ & 15, bytes_ >> 4], -1).permute(0, 2, 1).reshape(out_features, in_features)


@functools.lru_cache(maxsize=None)
def _cpu_pack_block(out_features: int, in_features: int) -> int | None:
    """The block of ``CPU_PACK_BLOCKS`` with which ``_unpack_cpu`` reads back this shape's packing exactly on this
    CPU's code path (checked once per shape on random codes), or None: a packing neither reads, whatever the torch
    release or CPU, keeps every call on the kernel instead of computing a wrong weight."""
    if in_features % 8 or inner_k_tiles(in_features) is None:
        return None
    codes = torch.randint(0, 16, (out_features, in_features), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32)
    packed = KERNELS["cpu"].pack(codes, inner_k_tiles(in_features))
    for block in CPU_PACK_BLOCKS:
        if out_features % block == 0 and torch.equal(
                _unpack_cpu(packed, out_features, in_features, block).to(torch.int32), codes):
            return block
    return None


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


@dataclasses.dataclass(frozen=True)
class PrefillRoute:
    """How a packed layer computes a call of ``min_rows`` rows or more: its weight dequantized to ``dtype`` and a
    dense GEMM. Fewer rows go through the weight-only kernel."""

    dtype: torch.dtype
    min_rows: int

    def describe(self) -> str:
        return f"from {self.min_rows} rows on: dequantized to {str(self.dtype).removeprefix('torch.')} + dense GEMM"


ROUTE_ROWS = (32, 128, 512)  # row counts the route is measured at; 512: the report's prompt


def _median_ms(call: Callable[[], object], repeats: int = 3) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure_route(layer: WeightOnlyLinear, rows: tuple[int, ...] = ROUTE_ROWS) -> PrefillRoute | None:
    """Time ``layer``'s kernel against its dequantize-and-GEMM path in fp32 and bf16 at each row count (medians of
    3, the paths side by side): the dense dtype that is faster at the most rows, from the smallest count at which
    it beats the kernel at that count and every larger one; None when it never does."""
    device = layer.device
    timings = {}
    with torch.no_grad():
        for count in rows:
            x = torch.randn(count, layer.in_features, device=device)
            timings[count] = {"kernel": _median_ms(lambda: layer._matmul(x.to(ACTIVATION_DTYPE)))}
            for dtype in (torch.float32, torch.bfloat16):
                timings[count][dtype] = _median_ms(lambda: nn.functional.linear(x.to(dtype), layer.dequantized(dtype)))
    dtype = min((torch.float32, torch.bfloat16), key=lambda d: timings[rows[-1]][d])
    faster = [timings[count][dtype] < timings[count]["kernel"] for count in rows]
    first = next((i for i in range(len(rows)) if all(faster[i:])), None)
    return None if first is None else PrefillRoute(dtype, rows[first])


@functools.lru_cache(maxsize=None)
def prefill_route(kind: str, device_type: str) -> PrefillRoute | None:
    """The measured route for ``kind`` ("int4" or "int8") layers on this machine, once per process, on a layer of
    the embedded model's MLP shape (1536 x 576, groups of 64). CUDA keeps its kernels (not measured: no GPU here)."""
    if device_type != "cpu":
        return None
    generator = torch.Generator().manual_seed(0)
    bits, group_size = (4, 64) if kind == "int4" else (8, 576)
    q = torch.randint(0, 2**bits, (1536, 576), generator=generator)
    scales = torch.rand(1536, 576 // group_size, generator=generator) * 0.01 + 1e-3
    probe = QuantLinear.from_quantized(q, scales, torch.full_like(scales, 2 ** (bits - 1)), bits, group_size, True)
    layer = Int4Linear(probe, route=None) if kind == "int4" else Int8Linear(probe, route=None)
    return measure_route(layer)


# What a fast layer is given for its calls of many rows: this machine's measured route, a route, or none (always the
# weight-only kernel).
RouteChoice = PrefillRoute | None | Literal["measured"]


def chosen_route(kind: str, device_type: str, route: RouteChoice) -> PrefillRoute | None:
    return prefill_route(kind, device_type) if route == "measured" else route


class WeightOnlyLinear(nn.Module):
    """What the fast layers share: the QuantLinear's bias and input scale kept as they are, bf16 activations into
    the kernel (``_matmul``, [tokens, in] -> [tokens, out]) and back to the caller's dtype; and for calls of many
    rows, the ``route`` through the dequantized weight and a dense GEMM."""

    bits: int
    route: PrefillRoute | None

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

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight in ``dtype``, as the kernel computes it."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        # under torch.compile the weight-only op itself goes to the compiler, which lowers it to its own kernels
        # (autotuned, inductor's weight-only GEMM templates); the route was measured against the eager kernel
        if self.route is not None and x.shape[0] >= self.route.min_rows and not torch.compiler.is_compiling():
            out = nn.functional.linear(x.to(self.route.dtype), self.dequantized(self.route.dtype))
        else:
            out = self._matmul(x.to(ACTIVATION_DTYPE).contiguous())
        out = out.to(dtype).reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(dtype)


class Int4Linear(WeightOnlyLinear):
    """A 4-bit QuantLinear repacked for torch's int4 weight-only matmul. The kernel is chosen at every call from
    the device the packed codes are on; each device's kernel tiles the codes its own way, so moving the layer
    to another device type re-tiles them (``_apply``)."""

    bits = 4

    def __init__(self, layer: QuantLinear, route: RouteChoice = "measured") -> None:
        super().__init__(layer)
        device = layer.qweight.device
        self.group_size = layer.group_size
        scales = layer.scales.float()
        offsets = (8 - layer.zeros().to(device)) * scales
        # [n_groups, out, 2]: the kernels read a group's scale and offset as one word
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales, offsets], -1).transpose(0, 1).contiguous().to(ACTIVATION_DTYPE))
        self.register_buffer("packed", self._pack(layer.codes().to(torch.int32)))
        blocked = device.type == "cpu" and _cpu_pack_block(self.out_features, self.in_features) is not None
        self.route = chosen_route("int4", device.type, route) if blocked else None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """(q - 8) * scale + offset per group, from the CPU kernel's tiling of the codes (``_unpack_cpu``)."""
        block = _cpu_pack_block(self.out_features, self.in_features)
        codes = _unpack_cpu(self.packed, self.out_features, self.in_features, block)
        groups = self.in_features // self.group_size
        scales, offsets = (self.scales_and_zeros[..., i].t().to(dtype)[:, :, None] for i in (0, 1))
        weight = (codes.view(self.out_features, groups, self.group_size).to(dtype) - 8) * scales + offsets
        return weight.view(self.out_features, self.in_features)

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
        if target.type != "cpu":
            self.route = None  # the dequantizing route reads the CPU tiling
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

    def __init__(self, layer: QuantLinear, route: RouteChoice = "measured") -> None:
        super().__init__(layer)
        self.register_buffer("weight", (layer.codes().to(torch.int16) - 128).to(torch.int8))
        self.register_buffer("scales", layer.scales.reshape(-1).to(ACTIVATION_DTYPE))
        device = self.weight.device.type
        self.route = chosen_route("int8", device, route) if device == "cpu" else None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

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
    routes: tuple[str, ...] = ()  # the prefill routes its fast layers take

    def describe(self) -> str:
        if not self.fast_layers and not self.reference_layers:
            return "dense (no quantized layers)"
        route = "; prefill " + " / ".join(self.routes) if self.routes else ""
        text = f"{self.kernel} ({self.fast_layers} layers; the rest bf16{route})" if self.fast_layers else ""
        rest = ", ".join(f"{n} on the dequantizing reference: {reason}" for reason, n in self.reference_layers.items())
        return "; ".join(part for part in (text, rest) if part)


def use_fast_kernels(model: nn.Module) -> KernelPlan:
    """Replace, in place, every QuantLinear a fast kernel supports (4-bit: Int4Linear; 8-bit per-channel
    symmetric: Int8Linear); the others stay on the reference.

    The kernels take bf16 activations, so the rest of the model (embeddings, norms, a tied lm_head) is cast to
    bf16 as well: otherwise the fp32 lm_head alone reads more bytes per token than all the int4 layers. Layers
    left on the reference keep their own fp16 scales; buffers stay as they are (``cast_parameters``)."""
    kernels: set[str] = set()
    routes: set[str] = set()
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
        routes.add(fast_layer.route.describe() if fast_layer.route else "on the kernel at every row count")
        fast += 1
    if fast:
        cast_parameters(model, ACTIVATION_DTYPE)
    return KernelPlan(" + ".join(sorted(kernels)), fast, reference, tuple(sorted(routes)))


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters only, as loading a checkpoint in ``dtype`` would: buffers such as RoPE's inverse
    frequencies stay fp32, and quantized layers (codes and scales are buffers) keep their own formats."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model
