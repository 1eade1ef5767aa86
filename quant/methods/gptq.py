"""GPTQ (Frantar et al., 2023): quantize one column at a time and push its error onto the columns not yet
quantized, weighted by the inverse Hessian H = 2 X X^T of the layer's calibration inputs.

Blocks are processed in order; each block's calibration inputs are the outputs of the already-quantized
previous block, as in the reference implementation. Within a block the order is "true sequential": the block
runs once over the whole calibration set, and each linear is quantized when that run first reaches it, so the
layers after it (o_proj after q/k/v, down_proj after gate/up) calibrate on the quantized layers' outputs. One
run per block does both jobs of the reference's two (Hessians, then outputs for the next block).
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from quant.config import QuantConfig
from quant.methods.base import (
    LayerRecord, Quantizer, block_linears, effective_group_size, find_params, pack_layer, quantize,
    replace_module, run_block, sequential_blocks, skipped_record,
)
from quant.qlinear import QuantLinear

log = logging.getLogger("quant")


class GPTQ:
    """Hessian accumulation and the blocked column loop for one linear layer."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, self.columns).float()
        tokens = inp.shape[0]
        # Running mean of 2 x x^T over all tokens seen so far.
        self.H *= self.nsamples / (self.nsamples + tokens)
        self.nsamples += tokens
        self.H += (2 / self.nsamples) * gram(inp)

    def fasterquant(
        self, bits: int, sym: bool, groupsize: int, blocksize: int = 128, percdamp: float = 0.01,
        actorder: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Returns codes [rows, columns], per-group scales and zeros [rows, columns / groupsize], and the
        dampening finally used. With ``actorder`` the groups are fixed on the original column order before
        the permutation (static groups), so packed groups stay contiguous."""
        W = self.layer.weight.detach().clone().float()
        H = self.H.clone()  # kept intact: linears that read the same input share one H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        n_groups = self.columns // groupsize
        scales = torch.zeros(self.rows, n_groups, device=W.device)
        zeros = torch.zeros_like(scales)
        if actorder:  # static groups: parameters from the original weight, before any error feedback
            for g in range(n_groups):
                s, z = find_params(W[:, g * groupsize : (g + 1) * groupsize], bits, sym)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        else:
            perm = torch.arange(self.columns, device=W.device)

        Hinv, percdamp = self._inverse_cholesky(H, percdamp)
        order = perm.tolist()  # Python ints: the loop below runs once per column, so it avoids tensor indexing
        Q = torch.zeros_like(W)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            # The block's columns as contiguous rows: the rank-1 update below then writes contiguous memory
            W1 = W[:, i1:i2].t().contiguous()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = Hinv1.diagonal().tolist()
            for i in range(i2 - i1):
                column = order[i1 + i]
                g = column // groupsize
                if not actorder and column % groupsize == 0:  # group parameters as the columns are reached,
                    # from the weights as already updated by the error of the columns before them
                    current = W1[i : i + groupsize].t() if i + groupsize <= i2 - i1 else \
                        torch.cat([W1[i:].t(), W[:, i2:]], dim=1)[:, :groupsize]
                    s, z = find_params(current, bits, sym)
                    scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                scale, zero = scales[:, g], zeros[:, g]
                w = W1[i]
                q = quantize(w, scale, zero, bits)
                Q1[i] = q
                err = (w - scale * (q - zero)) / d[i]
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                Err1[i] = err
            Q[:, i1:i2] = Q1.t()
            W[:, i2:] -= Err1.t().contiguous() @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after this block
        codes = Q[:, torch.argsort(perm)]
        return codes, scales, zeros, percdamp

    @staticmethod
    def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
        """Upper Cholesky factor of H^-1 after dampening; raises the dampening tenfold until H is positive
        definite (tiny calibration sets, collinear inputs) and never returns NaNs."""
        mean_diag = torch.mean(torch.diag(H))
        while percdamp <= 1.0:
            damped = H.clone()
            damped.diagonal().add_(percdamp * mean_diag)
            L, info = torch.linalg.cholesky_ex(damped)
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info == 0 and torch.isfinite(U).all():
                    return U, percdamp
            log.warning("GPTQ: Hessian not positive definite at damp %.3g; retrying with %.3g", percdamp, percdamp * 10)
            percdamp *= 10
        raise FloatingPointError("GPTQ: the Hessian stays singular with dampening up to 100% of its mean diagonal; "
                                 "check the calibration data for NaNs")


class GPTQQuantizer(Quantizer):
    name = "gptq"
    needs_calibration = True

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None
    ) -> list[LayerRecord]:
        records: list[LayerRecord] = []
        device = next(model.parameters()).device.type
        for step in sequential_blocks(model, calibration, self.name):
            linears = block_linears(step.block)
            block_records: dict[str, LayerRecord] = {}
            quantized: dict[str, QuantLinear] = {}
            hessians: dict[int, tuple[torch.Tensor, GPTQ]] = {}  # id(input) -> (input, its GPTQ)

            def quantize_on_call(name: str, layer_config: QuantConfig):
                def hook(linear: nn.Linear, args: tuple) -> None:
                    if name in quantized:  # called again in the same run: already on its quantized weights
                        return
                    gptq = GPTQ(linear)
                    started = time.perf_counter()
                    # Linears fed the very same tensor (q/k/v, gate/up) share one Hessian; the input is held
                    # in the dict so that its id cannot be reused by another tensor during this run.
                    with torch.autocast(device, enabled=False):  # Hessian and column loop in float32
                        if id(args[0]) in hessians:
                            source = hessians[id(args[0])][1]
                            gptq.H, gptq.nsamples = source.H, source.nsamples
                        else:
                            gptq.add_batch(args[0])
                            hessians[id(args[0])] = (args[0], gptq)
                        hessian_seconds = time.perf_counter() - started
                        quantized[name], block_records[name] = _quantize_layer(
                            f"{step.name}.{name}", linear, layer_config, gptq
                        )
                    block_records[name].hessian_seconds = hessian_seconds
                    # The rest of this run sees the quantized layer: the same values QuantLinear computes with.
                    linear.weight.copy_(quantized[name].dequantize(linear.weight.dtype))
                return hook

            handles = []
            for name, linear in linears.items():
                layer_config = config.for_layer(f"{step.name}.{name}")
                if layer_config is None:
                    block_records[name] = skipped_record(f"{step.name}.{name}", linear, config)
                else:
                    handles.append(linear.register_forward_pre_hook(quantize_on_call(name, layer_config)))
            try:
                # The block's matmuls in calib_dtype (float32 weights are cast per call, so the weights GPTQ
                # quantizes are untouched); bfloat16 halves the dominant cost on CPUs with bf16 dot products.
                with torch.autocast(device, dtype=getattr(torch, config.calib_dtype),
                                    enabled=config.calib_dtype != "float32"):
                    step.outputs = run_block(step.block, step.inputs, step.kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            missed = [name for name in linears if name not in block_records]
            if missed:
                raise RuntimeError(f"GPTQ: {step.name} never called {missed} in its forward; they have no inputs "
                                   f"to calibrate on")
            for name, qlayer in quantized.items():
                replace_module(step.block, name, qlayer)
            records += [block_records[name] for name in linears]
        return records


def _quantize_layer(
    full_name: str, linear: nn.Linear, layer_config: QuantConfig, gptq: GPTQ
) -> tuple[QuantLinear, LayerRecord]:
    started = time.perf_counter()
    group_size, _ = effective_group_size(linear.in_features, layer_config.group_size)
    q, scales, zeros, damp = gptq.fasterquant(
        layer_config.bits, layer_config.sym, group_size, layer_config.block_size,
        layer_config.damp_percent, layer_config.act_order,
    )
    qlayer, record = pack_layer(full_name, linear, layer_config, q, scales, zeros, group_size, started,
                                damp_percent=damp)
    record.output_error = output_error(linear.weight, qlayer.dequantize(), gptq.H)
    return qlayer, record


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x for x [tokens, features]. On CPU through numpy: its BLAS call for a matrix times its own transpose
    is syrk, which computes one triangle, half the multiply-adds of torch's gemm (measured 1.8x faster here)."""
    if x.device.type != "cpu":
        return x.t() @ x
    x = x.contiguous().numpy()
    return torch.from_numpy(x.T @ x)


def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs from their Hessian:
    ||(W - W_hat) X|| / ||W X|| = sqrt(tr(D H D^T) / tr(W H W^T))."""
    W = weight.detach().float()
    D = weight_hat - W
    return float(torch.sqrt((D @ H * D).sum() / (W @ H * W).sum().clamp(min=1e-12)))
