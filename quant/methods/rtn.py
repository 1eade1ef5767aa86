"""Round-to-nearest: each group of weights onto its own min/max grid, no calibration."""
from __future__ import annotations

import time

import torch
from torch import nn

from quant.config import QuantConfig
from quant.methods.base import (
    LayerRecord, Quantizer, effective_group_size, pack_layer, quantizable_layers, replace_module, rtn_codes,
    skipped_record,
)


class RTN(Quantizer):
    name = "rtn"

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None
    ) -> list[LayerRecord]:
        records = []
        for name, linear, layer_config in list(quantizable_layers(model, config)):
            if layer_config is None:
                records.append(skipped_record(name, linear, config))
                continue
            started = time.perf_counter()
            group_size, _ = effective_group_size(linear.in_features, layer_config.group_size)
            q, scales, zeros = rtn_codes(linear.weight, layer_config.bits, group_size, layer_config.sym)
            qlayer, record = pack_layer(name, linear, layer_config, q, scales, zeros, group_size, started)
            replace_module(model, name, qlayer)
            records.append(record)
        return records
