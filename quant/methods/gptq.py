"""GPTQ (Frantar et al., 2023): quantize one column at a time and push its error onto the columns not yet
quantized, weighted by the inverse Hessian H = 2 X X^T of the layer's calibration inputs.

Blocks are processed in order; each block's calibration inputs are the outputs of the already-quantized
previous block, as in the reference implementation.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from quant.config import QuantConfig
from quant.methods.base import (
    LayerRecord, Quantizer, block_linears, effective_group_size, find_params, pack_layer, quantize,
    replace_module, run_block, sequential_blocks, skipped_record,
)

log = logging.getLogger("quant")


class GPTQ:
    """Hessian accumulation and the blocked column loop for one linear layer."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, self.columns).t().float()
        tokens = inp.shape[1]
        # Running mean of 2 x x^T over all tokens seen so far.
        self.H *= self.nsamples / (self.nsamples + tokens)
        self.nsamples += tokens
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp @ inp.t()

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
        Q = torch.zeros_like(W)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                column = int(perm[i1 + i])
                g = column // groupsize
                if not actorder and column % groupsize == 0:  # group parameters as the columns are reached,
                    # from the weights as already updated by the error of the columns before them
                    current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :groupsize]
                    s, z = find_params(current, bits, sym)
                    scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                w, d = W1[:, i], Hinv1[i, i]
                q = quantize(w.unsqueeze(1), scales[:, g : g + 1], zeros[:, g : g + 1], bits).flatten()
                Q1[:, i] = q
                err = (w - scales[:, g] * (q - zeros[:, g])) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after this block
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
        for block_name, block, inputs, kwargs in sequential_blocks(model, calibration, self.name):
            targets = {}
            for name, linear in block_linears(block).items():
                full_name = f"{block_name}.{name}"
                layer_config = config.for_layer(full_name)
                if layer_config is None:
                    records.append(skipped_record(full_name, linear, config))
                else:
                    targets[name] = (full_name, linear, layer_config, GPTQ(linear))
            _accumulate_hessians(block, {name: target[3] for name, target in targets.items()}, inputs, kwargs)
            for name, (full_name, linear, layer_config, gptq) in targets.items():
                layer_started = time.perf_counter()
                group_size, _ = effective_group_size(linear.in_features, layer_config.group_size)
                q, scales, zeros, damp = gptq.fasterquant(
                    layer_config.bits, layer_config.sym, group_size, layer_config.block_size,
                    layer_config.damp_percent, layer_config.act_order,
                )
                qlayer, record = pack_layer(
                    full_name, linear, layer_config, q, scales, zeros, group_size, layer_started, damp_percent=damp
                )
                record.output_error = output_error(linear.weight, qlayer.dequantize(), gptq.H)
                replace_module(block, name, qlayer)
                records.append(record)
        return records


def _accumulate_hessians(block: nn.Module, gptqs: dict[str, GPTQ], inputs: list, kwargs: dict) -> None:
    """One pass of the calibration batches through the block, adding each linear's inputs to its Hessian.
    Linears fed the very same tensor (q/k/v, gate/up) share one Hessian instead of computing it again."""
    # Keyed by storage address; the tensor is kept so that its memory cannot be freed and reused by a
    # different input later in the same forward (which would make two unrelated linears "share").
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    owner: dict[str, str] = {}

    def new_batch(_module: nn.Module, _args: tuple) -> None:
        seen.clear()

    def add(name: str):
        def hook(_module: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
            pointer = inp[0].data_ptr()
            if pointer in seen:
                owner[name] = seen[pointer][0]
            else:
                seen[pointer] = (name, inp[0])
                gptqs[name].add_batch(inp[0])
        return hook

    handles = [block.register_forward_pre_hook(new_batch)]
    handles += [block.get_submodule(name).register_forward_hook(add(name)) for name in gptqs]
    try:
        run_block(block, inputs, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, source in owner.items():
        gptqs[name].H, gptqs[name].nsamples = gptqs[source].H, gptqs[source].nsamples


def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs from their Hessian:
    ||(W - W_hat) X|| / ||W X|| = sqrt(tr(D H D^T) / tr(W H W^T))."""
    W = weight.detach().float()
    D = weight_hat - W
    return float(torch.sqrt((D @ H * D).sum() / (W @ H * W).sum().clamp(min=1e-12)))
