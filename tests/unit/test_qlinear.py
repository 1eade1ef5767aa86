import pytest
import torch

from quant.config import QuantConfig
from quant.methods import get_method
from quant.methods.base import effective_group_size, find_params, rtn_codes
from quant.qlinear import QuantLinear, dequantized_weights, model_bytes, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [1, 7, 64, 577])
def test_packing_round_trips_exactly(bits, count):
    values = torch.randint(0, 2**bits, (5, count), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == (count * bits + 7) // 8  # no byte wasted
    assert torch.equal(unpack_bits(packed, bits, count).int(), values)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, True), (8, False), (2, False)])
@pytest.mark.parametrize("group_size", [16, 64])
def test_rtn_error_within_half_a_step(bits, sym, group_size):
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    q, scales, zeros = rtn_codes(weight, bits, group_size, sym)
    layer = QuantLinear.from_quantized(q, scales, zeros, bits, group_size, sym)
    step = scales.repeat_interleave(group_size, dim=1)
    error = (layer.dequantize() - weight).abs()
    assert (error <= step / 2 * (1 + 1e-5)).all(), float((error / step).max())
    assert torch.equal(layer.codes().float(), q)  # what is stored is what was computed


def test_find_params_keeps_zero_on_the_grid():
    """A weight of 0 (padding, pruned channels) quantizes to a code that dequantizes to exactly 0, and the grid
    spans each row's range, so no weight is clipped by more than half a step."""
    w = torch.tensor([[0.5, 1.0, 2.0, 0.0], [-3.0, -1.0, -0.5, 0.0], [-0.3, 0.7, 0.1, 0.0]])
    for sym in (True, False):
        scale, zero = find_params(w, 4, sym)
        assert torch.equal(zero, zero.round()) and ((zero >= 0) & (zero <= 15)).all()
        codes = torch.clamp(torch.round(w / scale) + zero, 0, 15)
        dequantized = scale * (codes - zero)
        assert (dequantized[:, -1] == 0).all()
        assert ((dequantized - w).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_forward_matches_dense_layer_on_dequantized_weight():
    weight = torch.randn(24, 64)
    q, scales, zeros = rtn_codes(weight, 4, 32, False)
    layer = QuantLinear.from_quantized(q, scales, zeros, 4, 32, False, bias=torch.randn(24))
    x = torch.randn(3, 5, 64)
    expected = torch.nn.functional.linear(x, layer.dequantize(), layer.bias.float())
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with dequantized_weights(layer):
        assert torch.equal(layer(x), layer(x))
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer._dequantized is None  # nothing stays behind the context


def test_packed_storage_is_about_four_bits_per_weight():
    weight = torch.randn(1536, 576)
    q, scales, zeros = rtn_codes(weight, 4, 64, True)
    layer = QuantLinear.from_quantized(q, scales, zeros, 4, 64, True)
    bits_per_weight = model_bytes(layer) * 8 / weight.numel()
    assert bits_per_weight == pytest.approx(4 + 16 / 64)  # int4 codes + one fp16 scale per 64 weights


@pytest.mark.parametrize("in_features,requested,expected,falls_back", [
    (576, 128, 64, True), (1536, 128, 128, False), (576, 32, 32, False), (90, 64, 90, True), (96, 128, 96, True),
    (576, None, 576, False),
])
def test_group_size_fallback(in_features, requested, expected, falls_back):
    size, reason = effective_group_size(in_features, requested)
    assert size == expected and in_features % size == 0
    assert (reason is not None) == falls_back


def test_misaligned_layers_fall_back_and_are_recorded(tiny_llama):
    # hidden 96 at g64: 64 does not divide 96, so those layers use g32; the MLP's 192-wide input takes g64.
    records = get_method("rtn").quantize(tiny_llama, QuantConfig(bits=4, group_size=64))
    by_width = {r.shape[1]: r for r in records}
    assert by_width[96].group_size == 32 and "96 % 64" in by_width[96].fallback
    assert by_width[192].group_size == 64 and by_width[192].fallback is None
    assert all(isinstance(tiny_llama.get_submodule(r.name), QuantLinear) for r in records)
    logits = tiny_llama(torch.randint(0, 128, (1, 16))).logits
    assert torch.isfinite(logits).all()


def test_layer_overrides_keep_a_layer_and_change_another(tiny_llama):
    config = QuantConfig.from_dict({"bits": 4, "group_size": 32,
                                    "layer_overrides": {"down_proj": {"group_size": 16}, "layers.0.self_attn.q_proj": "skip"}})
    records = {r.name: r for r in get_method("rtn").quantize(tiny_llama, config)}
    assert records["model.layers.0.self_attn.q_proj"].bits is None
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert records["model.layers.1.mlp.down_proj"].group_size == 16
    assert records["model.layers.1.mlp.up_proj"].group_size == 32
