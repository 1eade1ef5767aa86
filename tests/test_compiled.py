"""The compiled static-cache decoder: the eager loop's greedy tokens on every backend (and with the int4 kernel in
the graph), what it asks torch.compile for on each device, its attention on the shared key/value heads, and where
inductor keeps what it compiled."""
import copy
import os

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from transformers import AttentionInterface

from quant.compiled import KV_HEAD_ATTENTION, CompiledDecoder, sdpa_on_kv_heads, use_compile_cache
from quant.config import QuantConfig
from quant.kernels import use_fast_kernels
from quant.methods import get_method
from tests.rounding import assert_greedy_choices, decoded, eager_greedy, varied


@pytest.mark.float_sensitive
@pytest.mark.parametrize("quantized,backend,cpp_wrapper,compile_prefill", [
    (False, "eager", False, False), (True, "eager", False, True),
    # inductor autotunes the frozen prompt's GEMMs and caches none of it: 50-75 s every run on 2 cores
    pytest.param(True, "inductor", False, True, marks=pytest.mark.slow),
    (True, "inductor", True, False)])
def test_static_cache_decode_generates_the_eager_loops_tokens(tiny_llama, quantized, backend, cpp_wrapper,
                                                               compile_prefill):
    model = varied(tiny_llama)
    if quantized:  # the int4 kernel inside the compiled graph
        get_method("rtn").quantize(model, QuantConfig(method="rtn", bits=4, group_size=32))
        use_fast_kernels(model)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    assert len(set(eager_greedy(model, ids, 10)[0].tolist())) > 3
    decoder = CompiledDecoder(model, "cpu", backend, cpp_wrapper, compile_prefill)
    for _ in range(2):  # a second prefill starts a fresh cache: the same tokens again
        assert_greedy_choices(model, ids, decoded(decoder, ids, 10))


def test_decoders_of_different_models_never_share_a_compiled_step(tiny_llama):
    # the step keeps no guards on the model's modules, so only its own compiled entries tell two models apart: a
    # dense model, then its 4-bit copy on the dequantizing reference (other modules, the same dtypes and cache), then
    # the dense one again, each its own tokens
    dense = varied(tiny_llama)
    quantized = copy.deepcopy(dense)
    get_method("rtn").quantize(quantized, QuantConfig(method="rtn", bits=4, group_size=32))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    for model in (dense, quantized, dense):
        decoder = CompiledDecoder(model, "cpu", backend="eager")
        assert_greedy_choices(model, ids, decoded(decoder, ids, 8))


def test_a_cpu_decode_step_attends_on_the_shared_key_value_heads(tiny_llama, monkeypatch):
    model = varied(tiny_llama)  # 4 query heads on 2 key/value heads
    calls = []
    monkeypatch.setitem(AttentionInterface._global_mapping, KV_HEAD_ATTENTION,
                        lambda *args, **kwargs: calls.append(args[1].shape) or sdpa_on_kv_heads(*args, **kwargs))
    decoder = CompiledDecoder(model, "cpu", backend="eager")
    cache, token = decoder.prefill(torch.arange(10)[None], 3)
    assert not calls  # the prefill runs on the model's own attention
    decoder.decode(cache, token, 3)
    assert calls and all(shape[2] == 1 for shape in calls)
    assert model.config._attn_implementation == "sdpa"  # restored for everything else


@pytest.mark.float_sensitive
def test_attention_on_the_shared_heads_equals_attention_on_repeated_heads(tiny_llama):
    attention = tiny_llama.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 1, 24, generator=generator)
    key, value = torch.randn(2, 1, 2, 9, 24, generator=generator)
    mask = torch.arange(9)[None, None, None, :] < 7  # the static cache's empty slots masked out
    ours, _ = sdpa_on_kv_heads(attention, query, key, value, mask, scaling=0.2)
    repeated = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask, scale=0.2)
    assert torch.allclose(ours, repeated.transpose(1, 2), atol=1e-6)


def test_what_the_decoder_asks_torch_compile_for_on_each_device(tiny_llama, monkeypatch):
    # CUDA is never here: what the decoder asks torch.compile for on it is checked instead
    asked = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: asked.update(kwargs) or fn)
    decoder = CompiledDecoder(tiny_llama, "cuda:0")
    assert asked["options"]["triton.cudagraphs"] and asked.get("mode") is None
    assert asked["options"]["guard_filter_fn"] and asked["isolate_recompiles"] and asked["fullgraph"]
    assert decoder.attention == tiny_llama.config._attn_implementation
    CompiledDecoder(tiny_llama, "cpu", cpp_wrapper=True)
    assert asked["options"]["cpp_wrapper"] and not asked["options"]["triton.cudagraphs"]
    assert "max_autotune" not in asked["options"]  # the decode step: no GEMM autotuning


def test_a_compiled_prefill_is_autotuned_on_frozen_weights(tiny_llama, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append((fn, kwargs)) or fn)
    decoder = CompiledDecoder(tiny_llama, "cuda:0", compile_prefill=True)
    (_, step), (prompt, options) = compiled
    assert prompt == decoder._prompt and options["options"]["max_autotune"] and options["dynamic"] is False
    assert "max_autotune" not in step["options"]
    # decode steps replay a captured graph; the prompt, once per request, does not
    assert step["options"]["triton.cudagraphs"] and not options["options"]["triton.cudagraphs"]
    frozen = []  # inductor takes freezing from its global config, not from a call's options: set around the call
    monkeypatch.setattr(decoder, "prompt", lambda *args: frozen.append(torch._inductor.config.freezing) or args[0][:, -1:])
    decoder.prefill(torch.arange(6)[None], 3)
    assert frozen == [True] and not torch._inductor.config.freezing


def test_inductor_takes_what_the_decoder_asks_for_on_cuda(tiny_llama):
    # CUDA's options and attention compiled for a model on the CPU (captured graphs pass over CPU tensors): the
    # options are ones inductor accepts, and the step generates the eager loop's tokens
    model = varied(tiny_llama)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    decoder = CompiledDecoder(model, "cuda:0")
    assert_greedy_choices(model, ids, decoded(decoder, ids, 10))


def test_the_cpp_wrapper_is_refused_where_nothing_is_compiled(tiny_llama):
    with pytest.raises(ValueError, match="cpp_wrapper is an inductor option"):
        CompiledDecoder(tiny_llama, "cpu", backend="eager", cpp_wrapper=True)


def test_static_cache_decode_keeps_every_tensor_on_the_models_device(tiny_llama):
    model = tiny_llama.to("meta")  # a tensor created without device= would land on the CPU and fail the forward
    decoder = CompiledDecoder(model, "meta", backend="eager")
    cache, token = decoder.prefill(torch.zeros(1, 6, dtype=torch.long, device="meta"), 3)
    assert token.device.type == "meta"
    assert decoder.decode(cache, token, 3).device.type == "meta"
    assert {layer.keys.device.type for layer in cache.layers} == {"meta"}


def test_compiled_code_is_cached_beside_the_results_in_a_folder_per_cpu_capability(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    for unset in (None, default_cache_dir()):  # importing torch's compiler sets its default
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
        if unset:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", unset)
        folder = use_compile_cache(tmp_path)
        assert folder == tmp_path / torch.backends.cpu.get_cpu_capability().lower()  # e.g. .../avx512
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "results"))
    assert use_compile_cache().parent == tmp_path / "results" / "inductor"  # by default, beside the results
    # a folder the environment names stands (make test's second code path compiles into its own)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert use_compile_cache(tmp_path) == tmp_path / "chosen"
