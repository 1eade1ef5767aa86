"""GPTQ and GSQ against round-to-nearest on synthetic layers, where the answer is known."""
import copy
import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from quant.config import QuantConfig
from quant.methods import get_method
from quant.methods import gsq
from quant.methods.base import block_linears, dequantize, quantize_lm_head, rtn_codes
from tests.helpers.models import CALIBRATED_METHODS
from tests.helpers.rounding import assert_same_up_to_rounding
from quant.methods.gptq import GPTQ
from quant.methods.gsq import _search_scale
from quant.backends.inhouse import restore_quantized
from quant.qlinear import QuantLinear


def _rtn_weight(weight, bits, group_size, sym=True):
    q, scales, zeros = rtn_codes(weight, bits, group_size, sym)
    rows = weight.shape[0]
    return dequantize(q.view(rows, -1, group_size), scales.unsqueeze(-1), zeros.unsqueeze(-1)).view_as(weight)


def _gptq_weight(linear, x, bits, group_size, **kwargs):
    gptq = GPTQ(linear)
    gptq.add_batch(x)
    q, scales, zeros, _ = gptq.fasterquant(bits, True, group_size, **kwargs)
    return QuantLinear.from_quantized(q, scales, zeros, bits, group_size, True).dequantize(), q


def _output_error(weight, approx, x):
    return float((x @ weight.detach().t() - x @ approx.t()).norm())


def _correlated_inputs(tokens=2048, width=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width**0.5
    return torch.randn(tokens, width, generator=generator) @ mixing + 0.1 * torch.randn(tokens, width, generator=generator)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (4, 128)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, act_order):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    x = _correlated_inputs()
    gptq_weight, _ = _gptq_weight(linear, x, bits, group_size, actorder=act_order)
    rtn_weight = _rtn_weight(linear.weight.detach(), bits, group_size)
    assert _output_error(linear.weight, gptq_weight, x) < 0.9 * _output_error(linear.weight, rtn_weight, x)


def test_gptq_equals_rtn_when_the_hessian_is_the_identity():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    gptq = GPTQ(linear)
    gptq.H, gptq.nsamples = 2 * torch.eye(64), 1  # uncorrelated unit-variance inputs: no error is worth moving
    q, scales, zeros, _ = gptq.fasterquant(4, True, 32)
    q_rtn, scales_rtn, _ = rtn_codes(linear.weight.detach(), 4, 32, True)
    assert torch.equal(q, q_rtn) and torch.allclose(scales, scales_rtn)


def test_gptq_survives_dead_inputs_and_tiny_calibration_sets(caplog):
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    x = torch.randn(4, 64)  # 4 tokens for 64 columns: H has rank 4
    x[:, :8] = 0            # and eight inputs never fire
    gptq = GPTQ(linear)
    gptq.add_batch(x)
    q, scales, zeros, damp = gptq.fasterquant(4, True, 32, percdamp=1e-12)
    assert torch.isfinite(scales).all() and torch.isfinite(q).all()
    assert damp > 1e-12 and "retrying" in caplog.text


def test_gsq_beats_rtn_when_a_few_channels_have_large_activations():
    torch.manual_seed(0)
    block = nn.Module()
    block.proj = nn.Linear(128, 64, bias=False)
    x = torch.randn(2048, 128)
    x[:, :4] *= 50  # four salient input channels ...
    with torch.no_grad():  # ... whose weights are small, as in LLMs, so they do not set the group's range
        block.proj.weight[:, :4] *= 0.2
    config = QuantConfig(method="gsq", bits=3, group_size=128)
    scale = _search_scale(block, ["proj"], x.abs().mean(0), x, config)
    weight = block.proj.weight.detach()
    gsq_weight = _rtn_weight(weight * scale, 3, 128) / scale
    assert _output_error(weight, gsq_weight, x) < 0.8 * _output_error(weight, _rtn_weight(weight, 3, 128), x)
    assert scale[:4].mean() > scale[4:].mean()  # the salient channels were scaled up


def test_gsq_equals_rtn_when_activations_are_uniform():
    block = nn.Module()
    block.proj = nn.Linear(64, 16, bias=False)
    x = torch.ones(256, 64)
    scale = _search_scale(block, ["proj"], x.abs().mean(0), x, QuantConfig(method="gsq", group_size=32))
    assert torch.equal(scale, torch.ones(64))


@torch.no_grad()
def test_gsq_leaves_a_skipped_linear_of_a_scaling_group_exact(tiny_llama, calibration_ids):
    """q_proj kept in full precision shares its input (the norm's output) with k/v: folding their 1/s into the norm
    would feed it x / s with its weight unscaled (measured: 36% output error at 8 bits, against 0.4% without it)."""
    outputs = {}
    for label, model in (("before", tiny_llama), ("after", copy.deepcopy(tiny_llama))):
        if label == "after":
            config = QuantConfig(method="gsq", bits=8, group_size=32, layer_overrides=(("q_proj", "skip"),))
            get_method("gsq").quantize(model, config, calibration_ids)
        q_proj = model.model.layers[0].self_attn.q_proj
        handle = q_proj.register_forward_hook(lambda _m, _args, out: outputs.__setitem__(label, out))
        model(calibration_ids)
        handle.remove()
    assert isinstance(q_proj, nn.Linear)
    torch.testing.assert_close(outputs["after"], outputs["before"], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_gsq_clip_search_scores_a_scaled_layer_on_its_scaled_inputs(tiny_llama, calibration_ids, monkeypatch):
    """A folded group's weight is W diag(s) and its input x / s; the clip search must see both, so that the
    product it scores is the layer's real output W x (it saw x: W diag(s) x)."""
    original = copy.deepcopy(tiny_llama)
    features, clips = [], []
    real_inputs, real_clip = gsq._linear_inputs, gsq._search_clip
    monkeypatch.setattr(gsq, "_linear_inputs", lambda *args: features.append(real_inputs(*args)) or features[-1])
    monkeypatch.setattr(gsq, "_search_clip", lambda w, x, *args: clips.append((w, x)) or real_clip(w, x, *args))
    gsq.GSQ().quantize(tiny_llama, QuantConfig(method="gsq", group_size=32, clip_search=True), calibration_ids)
    names = list(block_linears(original.model.layers[0]))
    for index, block_features in enumerate(features):
        block_clips = dict(zip(names, clips[index * len(names):(index + 1) * len(names)]))
        for name in ("self_attn.q_proj", "mlp.gate_proj"):  # scaled, folded into a norm, not themselves a fold target
            weight, sample = block_clips[name]
            reference = block_features[name][1] @ original.model.layers[index].get_submodule(name).weight.t()
            torch.testing.assert_close(sample @ weight.t(), reference, rtol=1e-4, atol=1e-4)


def test_gsq_leaves_grouped_query_v_to_o_unscaled_unless_asked(tiny_llama, calibration_ids):
    """AWQ skips the v -> o pair when v's width is not o's input (grouped-query attention): no explicit fp16
    scale that AWQ-format kernels could not load; ``explicit_scales`` keeps one, and the label says so."""
    attention = tiny_llama.model.layers[0].self_attn
    assert attention.v_proj.out_features < attention.o_proj.in_features  # the fixture has grouped-query attention
    for explicit in (False, True):
        model = copy.deepcopy(tiny_llama)
        config = QuantConfig(method="gsq", group_size=32, explicit_scales=explicit)
        get_method("gsq").quantize(model, config, calibration_ids)
        o_proj = model.model.layers[0].self_attn.o_proj
        assert (o_proj.input_scale is not None) == explicit
        assert config.label == ("w4g32-sym-xs" if explicit else "w4g32-sym")


@pytest.mark.float_sensitive
@pytest.mark.parametrize("method", CALIBRATED_METHODS)
def test_calibration_in_chunks_cuts_a_per_sample_attention_mask(tiny_llama, calibration_ids, method):
    """Eager attention passes every block a mask with one row per sample; a chunk must get its own rows (a mask
    of the whole set does not broadcast against a chunk, so this fails with a shape error if it is not cut)."""
    tiny_llama.set_attn_implementation("eager")
    built = []
    for chunk in (None, 3):
        model = copy.deepcopy(tiny_llama)
        get_method(method).quantize(model, QuantConfig(method=method, group_size=32, calib_chunk=chunk), calibration_ids)
        built.append(model)
    # equal up to rounding, not bit for bit: a forward over 3 rows may sum in another order than over 8
    assert_same_up_to_rounding(tiny_llama, *built, calibration_ids[:2], "calib_chunk=3")


@pytest.mark.parametrize("method,extra", [("rtn", {}), ("gptq", {"act_order": True}), ("gsq", {"clip_search": True})])
@torch.no_grad()
def test_quantized_model_reloads_bit_identically(tiny_llama, calibration_ids, tmp_path, method, extra):
    baseline = tiny_llama
    model = copy.deepcopy(baseline)
    config = QuantConfig(method=method, bits=4, group_size=64, sym=method != "gsq", **extra)
    records = get_method(method).quantize(model, config, calibration_ids)
    save_model(model, str(tmp_path / "model.safetensors"))
    restored = restore_quantized(baseline, records, tmp_path / "model.safetensors")
    original, reloaded = model.state_dict(), restored.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    ids = calibration_ids[:2]
    assert torch.equal(model(ids).logits, restored(ids).logits)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
@torch.no_grad()
def test_a_quantized_lm_head_is_untied_from_the_embeddings_and_reloads(tiny_llama, calibration_ids, tmp_path, bits,
                                                                       group_size):
    baseline = tiny_llama
    model = copy.deepcopy(baseline)
    config = QuantConfig(method="rtn", bits=4, group_size=32, lm_head_bits=bits, lm_head_group_size=group_size)
    records = get_method("rtn").quantize(model, config) + [quantize_lm_head(model, config)]
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == bits
    assert records[-1].name == "lm_head" and records[-1].group_size == (group_size or 96)
    assert torch.equal(model.model.embed_tokens.weight, baseline.model.embed_tokens.weight)  # the input side as it was
    model.tie_weights()  # what loading or resizing calls: the quantized head must stay as it is
    assert not hasattr(model.lm_head, "weight") or not isinstance(model.lm_head.weight, torch.nn.Parameter)
    save_model(model, str(tmp_path / "model.safetensors"))
    restored = restore_quantized(baseline, records, tmp_path / "model.safetensors")
    assert isinstance(restored.lm_head, QuantLinear) and not restored.config.tie_word_embeddings
    ids = calibration_ids[:2]
    assert torch.equal(model(ids).logits, restored(ids).logits)
    assert config.label == f"w4g32-sym-head{bits}" + (f"g{group_size}" if group_size else "")


@pytest.mark.float_sensitive
@torch.no_grad()
def test_gptq_tracks_the_baseline_better_than_rtn(tiny_llama, calibration_ids):
    # (GSQ is not asked for here: a randomly initialised model has no salient channels to protect; its
    # comparison with RTN runs on smollm2 in tests/integration/test_smollm2.py.)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))
    reference = torch.log_softmax(tiny_llama(ids).logits, -1)

    def divergence(name):
        model = copy.deepcopy(tiny_llama)
        get_method(name).quantize(model, QuantConfig(method=name, bits=3, group_size=32), calibration_ids)
        logprobs = torch.log_softmax(model(ids).logits, -1)
        return float((reference.exp() * (reference - logprobs)).sum(-1).mean())

    assert divergence("gptq") < divergence("rtn")


def test_gptq_hessian_is_twice_the_mean_x_x_transpose_over_every_token():
    x = torch.randn(3, 40, 24, dtype=torch.float64).float()  # 3 samples of 40 tokens
    gptq = GPTQ(nn.Linear(24, 8))
    gptq.add_batch(x[:2])
    gptq.add_batch(x[2:])
    flat = x.reshape(-1, 24).double()
    torch.testing.assert_close((gptq.H / gptq.nsamples).double(), 2 * flat.t() @ flat / 120, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_gptq_calibrates_each_linear_on_the_already_quantized_layers_before_it(tiny_llama, calibration_ids, monkeypatch):
    """True sequential: o_proj's Hessian comes from attention over the quantized q/k/v, not the original ones."""
    original_inputs = []
    tiny_llama.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _m, a: original_inputs.append(a[0]))
    tiny_llama(calibration_ids)
    model = copy.deepcopy(tiny_llama)
    o_proj = model.model.layers[0].self_attn.o_proj
    hessian_inputs = {}
    add_batch = GPTQ.add_batch
    monkeypatch.setattr(GPTQ, "add_batch", lambda self, inp: (hessian_inputs.setdefault(self.layer, inp.clone()),
                                                            add_batch(self, inp)))
    get_method("gptq").quantize(model, QuantConfig(method="gptq", bits=2, group_size=32), calibration_ids)
    used = hessian_inputs[o_proj].reshape(original_inputs[0].shape)
    assert used.abs().sum() > 0
    assert not torch.allclose(used, original_inputs[0], atol=1e-3)  # 2-bit q/k/v changed what o_proj sees


@pytest.mark.float_sensitive
@torch.no_grad()
def test_gptq_bfloat16_calibration_casts_the_forward_not_the_quantization(tiny_llama, calibration_ids, monkeypatch):
    """calib_dtype bfloat16 runs the blocks' matmuls in bf16; Hessians and the column loop stay float32. The first
    block's q/k/v read the float32 norm output, so their codes match a float32 calibration bit for bit (block_size
    32 makes the column loop's lazy updates matmuls that autocast would otherwise have cast)."""
    hessian_input_dtypes = []
    add_batch = GPTQ.add_batch
    monkeypatch.setattr(GPTQ, "add_batch", lambda self, inp: (hessian_input_dtypes.append(inp.dtype),
                                                            add_batch(self, inp)))
    first_attention = {}
    for dtype in ("float32", "bfloat16"):
        model = copy.deepcopy(tiny_llama)
        config = QuantConfig(method="gptq", bits=4, group_size=32, block_size=32, calib_dtype=dtype)
        get_method("gptq").quantize(model, config, calibration_ids)
        first_attention[dtype] = model.model.layers[0].self_attn
    # per block: q/k/v (norm output), o_proj (attention output), gate/up (norm output), down_proj (SiLU product)
    assert hessian_input_dtypes == [torch.float32] * 8 + [torch.float32, torch.bfloat16] * 4
    for name in ("q_proj", "k_proj", "v_proj"):
        exact, fast = (getattr(attention, name).state_dict() for attention in first_attention.values())
        assert all(torch.equal(exact[key], fast[key]) for key in exact), name


def test_gptq_refuses_a_linear_the_forward_never_calls(tiny_llama, calibration_ids):
    model = copy.deepcopy(tiny_llama)
    model.model.layers[0].mlp.unused = nn.Linear(96, 96)
    with pytest.raises(RuntimeError, match="never called"):
        get_method("gptq").quantize(model, QuantConfig(method="gptq", bits=4, group_size=32), calibration_ids)
