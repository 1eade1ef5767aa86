"""Round-to-nearest: each group of weights onto its own min/max grid, no calibration."""
from __future__ import annotations

import torch
from torch import nn

from quant.config import QuantConfig
from quant.methods.base import LayerRecord, Quantizer, quantizable_layers, rtn_layer, skipped_record


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
            records.append(rtn_layer(model, name, linear, layer_config))
        return records
