"""Where every tensor lives after each step. CI has no GPU, so two stand-ins show on the CPU the bugs a second
device would show:

- the ``meta`` device plays the accelerator where a step must follow the baseline's device: a restored model,
  a deep copy, a layer moved after packing;
- ``torch.device("meta")`` as the default device while the model is on the CPU sends every tensor created
  without an explicit ``device=`` somewhere other than the model, as forgetting ``device=`` does on a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_model

from quant.config import QuantConfig
from quant.kernels import Int4Linear, use_fast_kernels
from quant.methods import get_method
from quant.methods.base import quantize_lm_head
from quant.backends.inhouse import restore_quantized
from quant.qlinear import QuantLinear
from tests.helpers.models import quantized_layer
from tests.helpers.meta_device import META, KernelCalls, devices

CONFIGS = {"rtn": {"sym": False}, "gptq": {"act_order": True}, "gsq": {"clip_search": True}}


def _quantized(model, calibration_ids, method):
    config = QuantConfig(method=method, bits=4, group_size=32, **CONFIGS[method])
    return get_method(method).quantize(model, config, calibration_ids)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@torch.no_grad()
def test_quantization_creates_no_tensor_off_the_models_device(tiny_llama, calibration_ids, method):
    model = copy.deepcopy(tiny_llama)
    with META:  # a tensor made without device= lands on meta, not beside the CPU model
        _quantized(model, calibration_ids, method)
    assert devices(model) == {torch.device("cpu")}
    assert torch.isfinite(model(calibration_ids[:1]).logits).all()


@pytest.mark.parametrize("method", ["rtn", "gsq"])  # gsq: explicit input scales (grouped-query o_proj)
@torch.no_grad()
def test_a_restored_model_lives_on_the_baselines_device(tiny_llama, calibration_ids, tmp_path, method):
    model = copy.deepcopy(tiny_llama)
    records = _quantized(model, calibration_ids, method)
    save_model(model, str(tmp_path / "model.safetensors"))
    baseline = copy.deepcopy(tiny_llama).to(META)
    baseline.tie_weights()  # (a move to meta unties them; a move to CUDA keeps them)
    restored = restore_quantized(baseline, records, tmp_path / "model.safetensors")
    assert any(isinstance(m, QuantLinear) for m in restored.modules())
    assert devices(restored) == {META}, "the cache restored layers off the baseline's device"


@torch.no_grad()
def test_a_quantized_lm_head_is_built_and_restored_on_the_models_device(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    config = QuantConfig(method="rtn", bits=4, group_size=32, lm_head_bits=8)
    with META:
        records = get_method("rtn").quantize(model, config) + [quantize_lm_head(model, config)]
    assert devices(model) == {torch.device("cpu")}
    save_model(model, str(tmp_path / "model.safetensors"))
    baseline = copy.deepcopy(tiny_llama).to(META)
    baseline.tie_weights()
    assert devices(restore_quantized(baseline, records, tmp_path / "model.safetensors")) == {META}


@torch.no_grad()
def test_a_packed_layer_moved_to_another_device_is_retiled_for_that_devices_kernel(monkeypatch):
    kernel_calls = KernelCalls(monkeypatch)
    layer = Int4Linear(quantized_layer(64, 128, 64))
    layer.to(META)
    layer(torch.randn(3, 128, device=META))
    assert devices(layer) == {META}
    assert kernel_calls.calls[-2:] == [("meta", {"meta"}), ("meta", {"meta"})], kernel_calls.calls
    assert not kernel_calls.mismatched(), "a kernel was called on tensors of another device"


@torch.no_grad()
def test_the_packed_codes_read_back_exactly():
    reference = quantized_layer(64, 128, 64)
    assert torch.equal(Int4Linear(reference).codes(), reference.codes().to(torch.int32))


@torch.no_grad()
def test_fast_kernels_on_the_models_device(tiny_llama, calibration_ids, monkeypatch):
    """use_fast_kernels on a quantized model on the meta device packs and multiplies there, with no tensor made
    on the default device."""
    kernel_calls = KernelCalls(monkeypatch)
    model = copy.deepcopy(tiny_llama)
    _quantized(model, calibration_ids, "rtn")
    model.to(META)
    with torch.device("cpu"):
        plan = use_fast_kernels(model)
    assert plan.fast_layers and plan.kernel == "fake meta kernel"
    assert devices(model) == {META}
    model(calibration_ids[:1].to(META))
    assert kernel_calls.calls and not kernel_calls.mismatched()
