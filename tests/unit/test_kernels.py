"""The fast int4 path agrees with the dequantizing reference; what it cannot take stays on the reference."""
import copy

import pytest
import torch

from quant.config import QuantConfig
from quant import kernels
from quant.kernels import Int4Linear, Int8Linear, unsupported_reason, use_fast_kernels
from quant.methods import get_method
from quant.qlinear import QuantLinear
from tests.helpers.models import kernel_layer
from tests.helpers.rounding import assert_kernel_agrees

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.float_sensitive  # every test here compares two kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,group_size", [((1536, 576), 64), ((576, 1536), 128), ((192, 576), 32), ((64, 256), 256)])
@pytest.mark.parametrize("sym", [True, False])
@torch.no_grad()
def test_int4_kernel_matches_the_reference(device, shape, group_size, sym):
    layer = kernel_layer(*shape, group_size, sym).to(device)
    fast = Int4Linear(layer)
    for tokens in (1, 7):  # decode and prefill shapes
        x = torch.randn(2, tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(device)
        assert_kernel_agrees(fast(x).float(), layer(x).float())


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_int8_kernel_matches_the_reference(device):
    """Per-channel symmetric 8-bit codes (rtn-w8, an 8-bit lm_head): the int8 weight is the codes minus 128."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (96, 160), generator=generator)
    scales = torch.rand(96, 1, generator=generator) * 0.01 + 1e-3
    layer = QuantLinear.from_quantized(q, scales, torch.full_like(scales, 128), 8, 160, True,
                                       bias=torch.randn(96, generator=generator)).to(device)
    fast = Int8Linear(layer)
    assert torch.equal(fast.weight.cpu().to(torch.int16) + 128, q.to(torch.int16))
    for tokens in (1, 7):
        x = torch.randn(2, tokens, 160, generator=torch.Generator().manual_seed(tokens)).to(device)
        assert_kernel_agrees(fast(x).float(), layer(x).float())


@pytest.mark.parametrize("bits,group_size,shape,reason", [
    (3, 64, (64, 128), "3-bit codes"), (4, 16, (64, 128), "group size 16"), (4, 32, (24, 96), "does not tile"),
    (8, 64, (64, 128), "8-bit codes in groups"),
])
def test_layers_the_kernel_cannot_take_say_why(bits, group_size, shape, reason):
    layer = kernel_layer(*shape, group_size, sym=True, bits=bits)
    assert reason in unsupported_reason(layer)
    with pytest.raises(ValueError, match=reason):
        (Int8Linear if bits == 8 else Int4Linear)(layer)


@torch.no_grad()
def test_an_8_bit_model_runs_on_the_int8_kernel(tiny_llama, calibration_ids):
    get_method("rtn").quantize(tiny_llama, QuantConfig(method="rtn", bits=8, group_size=None))
    fast = copy.deepcopy(tiny_llama)
    plan = use_fast_kernels(fast)
    assert plan.fast_layers == 14 and not plan.reference_layers and "_weight_int8pack_mm" in plan.describe()
    assert_kernel_agrees(fast(calibration_ids).logits, tiny_llama(calibration_ids).logits)


@torch.no_grad()
def test_a_quantized_model_on_the_fast_path_gives_the_reference_logits(tiny_llama, calibration_ids):
    get_method("rtn").quantize(tiny_llama, QuantConfig(method="rtn", bits=4, group_size=32))
    fast = copy.deepcopy(tiny_llama)
    plan = use_fast_kernels(fast)
    quantized = sum(isinstance(m, QuantLinear) for m in tiny_llama.modules())
    assert plan.fast_layers == quantized and not plan.reference_layers
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    assert_kernel_agrees(fast(calibration_ids).logits, tiny_llama(calibration_ids).logits)
    assert "_weight_int4pack_mm" in plan.describe()


@torch.no_grad()
def test_mixed_models_keep_unsupported_layers_on_the_reference(tiny_llama, calibration_ids):
    config = QuantConfig.from_dict({"method": "rtn", "bits": 4, "group_size": 32, "layer_overrides": {"down_proj": {"bits": 3}}})
    get_method("rtn").quantize(tiny_llama, config)
    fast = copy.deepcopy(tiny_llama)
    plan = use_fast_kernels(fast)
    assert plan.reference_layers == {"3-bit codes (the kernels are 4- and 8-bit)": 2}  # one down_proj per block
    assert "2 on the dequantizing reference: 3-bit codes" in plan.describe()
    assert_kernel_agrees(fast(calibration_ids).logits, tiny_llama(calibration_ids).logits)


# ---- prefill: many rows through the dequantized weight and a dense GEMM ----------------------------------------

@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (192, 576), (64, 256)])
def test_the_cpu_packing_reads_back_exactly(shape):
    """The packing's block depends on the code path ATen runs (64 rows on AVX-512, 32 on AVX2): make test's second
    run reads back the other one."""
    assert kernels._cpu_pack_block(*shape) in kernels.CPU_PACK_BLOCKS
    assert kernels._cpu_pack_block(48, 256) is None  # not a whole block on any path: calls stay on the kernel


@pytest.mark.parametrize("shape,group_size", [((1536, 576), 64), ((576, 1536), 128), ((64, 256), 256)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_the_dense_prefill_route_matches_the_reference(shape, group_size, sym, dtype):
    """Forced from one row on, every call goes through the dequantized weight: within the kernels' tolerance of
    the reference, and the weight is the one the kernel itself computes with (read through it with the identity)."""
    layer = kernel_layer(*shape, group_size, sym)
    fast = Int4Linear(layer, route=kernels.PrefillRoute(dtype, 1))
    x = torch.randn(2, 9, shape[1], generator=torch.Generator().manual_seed(1))
    assert_kernel_agrees(fast(x).float(), layer(x).float())
    eye = torch.eye(shape[1], dtype=kernels.ACTIVATION_DTYPE)
    through_kernel = fast._matmul(eye).t().float()
    assert_kernel_agrees(fast.dequantized(torch.float32), through_kernel)
    on_kernel = Int4Linear(layer, route=None)
    assert_kernel_agrees(fast(x).float(), on_kernel(x).float())


@torch.no_grad()
def test_the_int8_dense_route_matches_the_reference():
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (96, 160), generator=generator)
    scales = torch.rand(96, 1, generator=generator) * 0.01 + 1e-3
    layer = QuantLinear.from_quantized(q, scales, torch.full_like(scales, 128), 8, 160, True)
    fast = Int8Linear(layer, route=kernels.PrefillRoute(torch.float32, 4))
    for tokens in (1, 7):  # the kernel below 4 rows, the dense route from 4 on
        x = torch.randn(1, tokens, 160, generator=torch.Generator().manual_seed(tokens))
        assert_kernel_agrees(fast(x).float(), layer(x).float())


def test_the_route_starts_where_the_dense_path_wins_at_every_larger_count(monkeypatch):
    """Scripted timings (ms) per row count: fp32 dense wins from 128 rows on (at 32 it loses), bf16 is slower."""
    script = {32: [1.0, 2.0, 3.0], 128: [4.0, 3.0, 9.0], 512: [16.0, 10.0, 30.0]}  # kernel, fp32, bf16
    calls = iter([t for count in (32, 128, 512) for t in script[count]])
    monkeypatch.setattr(kernels, "_median_ms", lambda call, repeats=3: next(calls))
    layer = Int4Linear(kernel_layer(64, 256, 64, True), route=None)
    assert kernels.measure_route(layer, (32, 128, 512)) == kernels.PrefillRoute(torch.float32, 128)
    never = iter([1.0, 2.0, 3.0] * 3)
    monkeypatch.setattr(kernels, "_median_ms", lambda call, repeats=3: next(never))
    assert kernels.measure_route(layer, (32, 128, 512)) is None
