"""The suite's own RTN / GPTQ / GSQ (quant.methods): packed QuantLinear layers saved as safetensors, restored
bit-identically onto the baseline's skeleton. The reference every library backend is compared with."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_model as save_safetensors
from torch import nn

from quant.backends.base import Backend
from quant.config import QuantConfig
from quant.methods import METHODS, LayerRecord, get_method
from quant.methods.base import quantize_lm_head, replace_module, untie_output
from quant.qlinear import QuantLinear

WEIGHTS = "model.safetensors"


class InHouse(Backend):
    name = "inhouse"
    methods = tuple(METHODS)

    def code(self, config: QuantConfig) -> tuple[str, ...]:
        return (*super().code(config), type(get_method(config.method)).__module__)

    def needs_calibration(self, config: QuantConfig) -> bool:
        return get_method(config.method).needs_calibration

    def quantize(self, baseline: nn.Module, tokenizer: Any, config: QuantConfig, calibration: torch.Tensor | None,
                 folder: Path) -> list[LayerRecord]:
        model = copy.deepcopy(baseline)
        records = get_method(config.method).quantize(model, config, calibration)
        head = quantize_lm_head(model, config)
        save_safetensors(model, str(folder / WEIGHTS))
        return records + ([head] if head else [])

    def load(self, baseline: nn.Module, folder: Path, records: list[LayerRecord], device: str
             ) -> tuple[nn.Module, str]:
        return restore_quantized(baseline, records, folder / WEIGHTS), "QuantLinear (dequantizing reference)"


def restore_quantized(baseline: nn.Module, records: list[LayerRecord], path: Path) -> nn.Module:
    """Rebuild a quantized model from the baseline's skeleton and its saved tensors (bit-identical), on the
    baseline's device: each QuantLinear is created where the linear it replaces lives, and the saved tensors
    are copied into place."""
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    model = copy.deepcopy(baseline)
    for record in records:
        if record.bits is None:
            continue
        linear = model.get_submodule(record.name)
        if linear is model.get_output_embeddings():
            untie_output(model)
        out_features, in_features = record.shape
        qlayer = QuantLinear(
            in_features, out_features, record.bits, record.group_size, sym=f"{record.name}.qzeros" not in keys,
            bias=linear.bias is not None, input_scale=f"{record.name}.input_scale" in keys,
            device=linear.weight.device,
        )
        replace_module(model, record.name, qlayer)
    tensors = load_safetensors(str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)  # copies onto each tensor's own device
    # a tied weight (lm_head = embed_tokens) is saved once: missing under one name, loaded under the other
    state = model.state_dict(keep_vars=True)
    loaded = {id(state[name]) for name in tensors if name in state}
    missing = [name for name in missing if id(state[name]) not in loaded]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the baseline's layout (missing {missing}, unexpected {unexpected}); "
                         "delete this cache entry to rebuild it")
    return model
