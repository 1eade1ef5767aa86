"""The compiled static-cache decoder: the eager loop's greedy tokens on every backend (and with the int4 kernel in
the graph), what it asks torch.compile for on each device, its attention on the shared key/value heads, and where
inductor keeps what it compiled."""
import copy
import os
from pathlib import Path

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from transformers import AttentionInterface

from quant.compiled import (KV_HEAD_ATTENTION, CompiledDecoder, PromptForward, cpu_fingerprint, model_fingerprint,
                            sdpa_on_kv_heads, use_compile_cache)
from quant.config import QuantConfig
from quant.kernels import use_fast_kernels
from quant.methods import get_method
from tests.helpers.rounding import (GREEDY_TIE, GREEDY_TIE_ACROSS_KERNELS, assert_greedy_choices, decoded, eager_greedy,
                            varied)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("quantized,backend,cpp_wrapper,compile_prefill", [
    (False, "eager", False, False), (True, "eager", False, True),
    # compiling the prompt ahead of time, autotuning its GEMMs: about 80 s on 2 cores where the result cache is cold,
    # as it always is on CI (then loaded from the cache: 13 s for the test)
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
    # inductor's packaged prompt runs the int4 weights through its own GEMM template, the judge through ATen's
    # kernel (measured on the tiny model: both within 1.3% of the float reference's keys and values)
    tie = GREEDY_TIE_ACROSS_KERNELS if backend == "inductor" and compile_prefill and quantized else GREEDY_TIE
    for _ in range(2):  # a second prefill starts a fresh cache: the same tokens again
        assert_greedy_choices(model, ids, decoded(decoder, ids, 10), tie)


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


def test_a_compiled_prefill_is_compiled_once_frozen_and_autotuned_then_loaded_from_the_cache(
        tiny_llama, monkeypatch, tmp_path):
    """The prompt's package is compiled once per model, prompt shape and CPU, and later decoders load it; its keys
    and values fill the static cache the decode continues from. (Inductor's own compile is the slow test above;
    here a package that runs the exported forward stands in for it.)"""
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path))
    compiled, loaded = [], []

    def compile_package(exported, package_path, inductor_configs):
        compiled.append(dict(inductor_configs))
        inductor_configs["aot_inductor.package"] = True  # as AOTInductor does to the options it is given
        Path(package_path).write_bytes(b"what inductor compiled")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_package)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: loaded.append(path) or PromptForward(model))
    model, ids = varied(tiny_llama), torch.arange(3, 9)[None]
    cache, token = CompiledDecoder(model, "cpu", compile_prefill=True).prefill(ids, 3)
    assert len(compiled) == 1 and compiled[0]["freezing"] and compiled[0]["max_autotune"]
    assert not compiled[0]["triton.cudagraphs"]  # a prompt runs once per request: nothing to replay
    assert_greedy_choices(model, ids, token)
    eager_cache, _ = CompiledDecoder(model, "cpu", backend="eager").prefill(ids, 3)
    assert cache.get_seq_length() == eager_cache.get_seq_length() == 6
    for ours, eager in zip(cache.layers, eager_cache.layers):  # the same slots filled (another mask: other last bits)
        assert torch.allclose(ours.keys, eager.keys, atol=1e-5) and torch.allclose(ours.values, eager.values, atol=1e-5)
    CompiledDecoder(model, "cpu", compile_prefill=True).prefill(ids, 5)  # another decoder, the same prompt shape
    assert len(compiled) == 1 and len(loaded) == 2 and loaded[0] == loaded[1]
    CompiledDecoder(model, "cpu", compile_prefill=True).prefill(torch.arange(7)[None], 3)  # another shape
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1  # another model
    CompiledDecoder(model, "cpu", compile_prefill=True).prefill(ids, 3)
    assert len(compiled) == 3 and len(set(loaded)) == 3


def test_a_decoder_gives_the_size_of_its_prompts_packages(tiny_llama, monkeypatch, tmp_path):
    """A package carries its own weights (folded and repacked for its GEMMs): its size is kept for the report, once
    per prompt shape. The stand-in compiler writes a package of a known size."""
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda exported, package_path, inductor_configs:
                        Path(package_path).write_bytes(bytes(1000 + exported.example_inputs[0][0].shape[1])))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: PromptForward(tiny_llama))
    decoder = CompiledDecoder(tiny_llama, "cpu", compile_prefill=True)
    assert decoder.package_bytes is None
    decoder.compile_prompt(torch.arange(3, 9)[None])
    decoder.compile_prompt(torch.arange(3, 9)[None])  # the same shape: loaded once, counted once
    assert decoder.package_bytes == 1006
    decoder.compile_prompt(torch.arange(3, 12)[None])  # another shape, another package
    assert decoder.package_bytes == 1006 + 1009


def test_a_models_fingerprint_changes_with_any_tensor_and_not_without(tiny_llama):
    before = model_fingerprint(tiny_llama)
    assert model_fingerprint(copy.deepcopy(tiny_llama)) == before
    with torch.no_grad():
        tiny_llama.model.norm.weight[3] += 1e-3
    assert model_fingerprint(tiny_llama) != before


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


def test_a_package_compiled_for_one_code_path_is_not_served_to_another(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    default = cpu_fingerprint()
    assert cpu_fingerprint() == default
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    assert cpu_fingerprint() != default
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX")
    assert cpu_fingerprint() != default
