"""GPTQ (Frantar et al., 2023): quantize one column at a time and push its error onto the columns not yet
quantized, weighted by the inverse Hessian H = 2 X X^T of the layer's calibration inputs.

Blocks are processed in order; each block's calibration inputs are the outputs of the already-quantized
previous block, as in the reference implementation. Within a block the order is "true sequential": the
layers after a quantized one (o_proj after q/k/v, down_proj after gate/up) calibrate on its quantized
outputs. With the calibration set in one forward, that forward quantizes each linear when it first reaches
it and its output is the block's output. In chunks of samples (``calib_chunk``), each pass over the chunks
accumulates the Hessian of the next linears reached (those reading one input) and stops each forward there;
they are quantized on the last chunk, and a final pass gives the block's output. H sums the tokens sample by
sample, so for the same inputs it has the same bits however the set is chunked. The inputs themselves come from
block forwards over chunk-sized batches, which some matmul kernels round differently (AMX for bf16), so the codes
are the unchunked ones up to rounding ties (tests/helpers/rounding.py says how close).
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from quant.config import QuantConfig
from quant.methods.base import (
    BlockStep, LayerRecord, Quantizer, StopForward, block_linears, block_output, effective_group_size,
    find_params, pack_layer, quantize, replace_module, run_block, sequential_blocks, skipped_record,
)
from quant.qlinear import QuantLinear

log = logging.getLogger("quant")


class GPTQ:
    """Hessian accumulation and the blocked column loop for one linear layer."""

    def __init__(self, layer: nn.Linear, shared: GPTQ | None = None) -> None:
        """``shared``: a layer with the same inputs (q, k, v) whose Hessian this one uses instead of its own."""
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        if shared is not None:
            self.H, self.nsamples = shared.H, shared.nsamples
        else:
            self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device)
            self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Add 2 x x^T of every token of ``inp`` [samples, tokens, columns] to H, one sample at a time: the
        sum then takes the same steps in the same order however the samples were split into forwards.
        ``fasterquant`` divides by the token count (the reference keeps a running mean: the same matrix)."""
        for sample in inp.reshape(inp.shape[0], -1, self.columns):
            sample = sample.float()
            # one fused multiply-add per 512-token sample: 1.3-1.6x the time of a single x^T x over all the tokens
            # (measured on this CPU), for a sum that does not depend on the chunks
            self.H.addmm_(sample.t(), sample, alpha=2)
            self.nsamples += sample.shape[0]

    def fasterquant(
        self, bits: int, sym: bool, groupsize: int, blocksize: int = 128, percdamp: float = 0.01,
        actorder: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Returns codes [rows, columns], per-group scales and zeros [rows, columns / groupsize], and the
        dampening finally used. With ``actorder`` the groups are fixed on the original column order before
        the permutation (static groups), so packed groups stay contiguous."""
        W = self.layer.weight.detach().clone().float()
        H = self.H / self.nsamples  # a new tensor: linears that read the same input share self.H
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
        for step in sequential_blocks(model, calibration, self.name, config.calib_chunk):
            linears = block_linears(step.block)
            block = BlockCalibration(step, config, device)
            # The block's matmuls in calib_dtype (float32 weights are cast per call, so the weights GPTQ
            # quantizes are untouched); bfloat16 halves the dominant cost on CPUs with bf16 dot products.
            with torch.autocast(device, dtype=getattr(torch, config.calib_dtype),
                                enabled=config.calib_dtype != "float32"):
                step.outputs = block.run()
            for name, qlayer in block.quantized.items():
                replace_module(step.block, name, qlayer)
            records += [block.records[name] for name in linears]
        return records


class BlockCalibration:
    """True-sequential GPTQ over one block's chunks of calibration samples (see the module docstring)."""

    def __init__(self, step: BlockStep, config: QuantConfig, device: str) -> None:
        self.step, self.device = step, device
        self.chunks = step.chunks()
        self.records: dict[str, LayerRecord] = {}
        self.quantized: dict[str, QuantLinear] = {}
        self.todo: dict[str, QuantConfig] = {}
        self.stage: GPTQ | None = None  # the Hessian of this pass's linears, over its chunks so far
        self.stage_seconds = 0.0  # spent accumulating it
        for name, linear in block_linears(step.block).items():
            layer_config = config.for_layer(f"{step.name}.{name}")
            if layer_config is None:
                self.records[name] = skipped_record(f"{step.name}.{name}", linear, config)
            else:
                self.todo[name] = layer_config

    def run(self) -> torch.Tensor:
        """Quantize every linear to do; returns the block's outputs on the quantized weights."""
        single = len(self.chunks) == 1
        while True:
            self.stage = None
            done = len(self.quantized)
            outputs = [self._forward(inputs, kwargs, last=index == len(self.chunks) - 1, single=single)
                       for index, (inputs, kwargs) in enumerate(self.chunks)]
            missed = [name for name in self.todo if name not in self.quantized]
            if not missed:
                return torch.cat(outputs) if single else run_block(self.step.block, self.chunks)
            if len(self.quantized) == done:
                raise RuntimeError(f"GPTQ: {self.step.name} never called {missed} in its forward; they have no "
                                   f"inputs to calibrate on")

    def _forward(self, inputs: torch.Tensor, kwargs: dict, last: bool, single: bool) -> torch.Tensor | None:
        """One chunk's forward. Its first linear still to do opens (or, on later chunks, adds to) the pass's
        Hessian, as do the linears that read the same tensor; on the last chunk each is quantized as it is
        reached. A linear still to do that reads another tensor ends the forward, unless the set is one
        chunk: its Hessian is then complete at once, so the same forward goes on through every stage."""
        reading: list[torch.Tensor] = []  # the tensor this chunk's stage linears read

        def hook(name: str):
            def pre_hook(linear: nn.Linear, args: tuple) -> None:
                if name not in self.todo or name in self.quantized:
                    return
                if not reading or args[0] is not reading[0]:
                    if reading and not single:
                        raise StopForward
                    reading[:] = [args[0]]
                    self._accumulate(linear, args[0], new_stage=single or self.stage is None)
                if last:
                    self._quantize(name, linear)
            return pre_hook

        handles = [linear.register_forward_pre_hook(hook(name))
                   for name, linear in block_linears(self.step.block).items()]
        try:
            return block_output(self.step.block(inputs, **kwargs))
        except StopForward:
            return None
        finally:
            for handle in handles:
                handle.remove()

    def _accumulate(self, linear: nn.Linear, inputs: torch.Tensor, new_stage: bool) -> None:
        started = time.perf_counter()
        if new_stage:
            self.stage, self.stage_seconds = GPTQ(linear), 0.0
        with torch.autocast(self.device, enabled=False):  # Hessian in float32
            self.stage.add_batch(inputs)
        self.stage_seconds += time.perf_counter() - started

    def _quantize(self, name: str, linear: nn.Linear) -> None:
        """Quantize ``linear`` on the stage's Hessian; the rest of the forward sees the quantized layer (the same
        values QuantLinear computes with)."""
        gptq = GPTQ(linear, shared=self.stage)
        with torch.autocast(self.device, enabled=False):  # column loop in float32
            self.quantized[name], record = _quantize_layer(f"{self.step.name}.{name}", linear, self.todo[name], gptq)
        # the Hessian's time goes to the stage's first linear; the ones sharing it cost nothing more
        record.hessian_seconds, self.stage_seconds = self.stage_seconds, 0.0
        self.records[name] = record
        linear.weight.copy_(self.quantized[name].dequantize(linear.weight.dtype))


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


def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs from their Hessian:
    ||(W - W_hat) X|| / ||W X|| = sqrt(tr(D H D^T) / tr(W H W^T))."""
    W = weight.detach().float()
    D = weight_hat - W
    return float(torch.sqrt((D @ H * D).sum() / (W @ H * W).sum().clamp(min=1e-12)))
