"""perf.measure on a tiny model: every figure present and consistent; the interleaved rounds, their speed-ups and
the busy-machine detector."""
import copy
import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from quant.config import ConfigError, QuantConfig
from quant.kernels import use_fast_kernels
from quant.memory import memory_in_use, peak_memory
from quant.methods import get_method
from quant.methods.base import quantize_lm_head
from quant.compiled import CompiledDecoder
from quant.perf import (PerfSettings, Rounds, cpu_seconds, interleaved_latency, kv_cache_bytes, machine_facts, measure,
                        memory_bandwidth, others_share, paired_speedup, roofline, unmeasurable_reason,
                        weight_bytes_per_token)
from quant.qlinear import model_bytes
from tests.helpers.compilers import missing_compiler

SHORT = PerfSettings(prompt_tokens=16, new_tokens=4, batch=2, batch_prompt_tokens=8, batch_new_tokens=2,
                     warmup=0, repeats=1)


def test_measure_reports_latency_throughput_and_memory(tiny_llama, calibration_ids):
    get_method("rtn").quantize(tiny_llama, QuantConfig(method="rtn", bits=4, group_size=32))
    use_fast_kernels(tiny_llama)
    # a decode step that takes at least 20 ms: a measurement that times decode steps reads at least that
    tiny_llama.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(0.02) if _[1][0].shape[1] == 1 else None)
    result = measure(tiny_llama, calibration_ids[:1], "cpu", SHORT)
    assert result["decode_ms_per_token"] >= 20 and result["decode_tokens_per_s"] <= 50
    assert result["output_tokens_per_s"] < result["decode_tokens_per_s"]  # the prefill counts against it
    assert result["ttft_ms"] > 0 and result["batch_decode_tokens_per_s"] > 0
    assert result["batch"] == 2 and result["settings"]["new_tokens"] == 4
    assert result["threads"] == torch.get_num_threads()
    # halfway through the new tokens after the prompt, in the activations' dtype (bf16 on the fast kernels)
    tokens = SHORT.prompt_tokens + SHORT.new_tokens // 2
    assert result["bytes_per_token"] == result["model_bytes"] + kv_cache_bytes(tiny_llama, tokens)


def test_peak_memory_is_the_models_weights_plus_what_inference_adds(tiny_llama, calibration_ids):
    if memory_in_use("cpu") is None:
        pytest.skip("no /proc/self/status on this platform")
    resident = torch.ones(128 * 2**20 // 4)  # 128 MiB held beside the model, as a baseline is beside its quantized copy
    result = measure(tiny_llama, calibration_ids[:1], "cpu", SHORT)
    assert result["peak_memory_bytes"] == result["model_bytes"] + result["working_memory_bytes"]
    # the process's peak counts the resident block; the model's does not (a tiny model's decode adds a few MB)
    assert peak_memory("cpu") > resident.numel() * 4 > result["peak_memory_bytes"]


def test_measure_times_the_compiled_decode_when_asked(tiny_llama, calibration_ids):
    result = measure(tiny_llama, calibration_ids[:1], "cpu", dataclasses.replace(SHORT, compiled="eager"))
    assert result["compiled_decode_tokens_per_s"] == pytest.approx(1000 / result["compiled_decode_ms_per_token"])
    assert "compiled_decode_ms_per_token" not in measure(tiny_llama, calibration_ids[:1], "cpu", SHORT)
    assert "compiled_ttft_ms" not in result  # timed in the interleaved rounds


def test_a_decode_step_reads_one_row_of_an_embedding_matrix_the_output_does_not_share(tiny_llama):
    tied = weight_bytes_per_token(tiny_llama)
    assert tied == model_bytes(tiny_llama)  # the tied matrix is read whole, by the output projection
    config = QuantConfig(method="rtn", bits=4, group_size=32, lm_head_bits=8)
    quantize_lm_head(tiny_llama, config)
    embedding = tiny_llama.model.embed_tokens.weight
    row = embedding[0].numel() * embedding.element_size()
    assert weight_bytes_per_token(tiny_llama) == model_bytes(tiny_llama) - embedding.numel() * embedding.element_size() + row


def test_unknown_perf_settings_are_refused():
    with pytest.raises(ValueError, match="prompt_token"):
        PerfSettings.from_dict({"prompt_token": 512})


def test_machine_facts_name_the_dtype_and_threads():
    facts = machine_facts("cpu", torch.bfloat16)
    assert facts["dtype"] == "bfloat16" and facts["torch_threads"] == torch.get_num_threads()


def test_roofline_counts_weights_and_kv_cache_read_per_token(tiny_llama):
    config = tiny_llama.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32
    assert kv_cache_bytes(tiny_llama, 100) == 100 * per_token
    row = {"decode_ms_per_token": 10.0, "bytes_per_token": 50e6}
    line = roofline(row, bandwidth=20e9)
    assert line == {"achieved_gb_per_s": pytest.approx(5.0), "bandwidth_share": pytest.approx(0.25),
                    "roofline_ms_per_token": pytest.approx(2.5)}


def test_memory_bandwidth_is_a_copy_of_read_and_written_bytes():
    bandwidth = memory_bandwidth("cpu", megabytes=16, repeats=2)
    assert 1e8 < bandwidth < 1e13  # between 0.1 GB/s and 10 TB/s: a rate, not a size or a time


def test_interleaved_rounds_time_every_model_once_per_round_in_a_rotating_order(tiny_llama, calibration_ids):
    """Load that comes and goes must hit every variant alike: no model is always first or always last."""
    models = {"a": tiny_llama, "b": copy.deepcopy(tiny_llama), "c": copy.deepcopy(tiny_llama)}
    order = []
    for name, model in models.items():
        model.model.layers[0].register_forward_pre_hook(
            lambda _m, args, name=name: order.append(name) if args[0].shape[1] == SHORT.prompt_tokens else None)
    rounds = interleaved_latency(models, calibration_ids[:1], "cpu", dataclasses.replace(SHORT, warmup=0), 3)
    assert all(len(rounds.ttft[n]) == len(rounds.decode[n]) == 3 for n in models) and len(rounds.probe_bytes_per_s) == 3
    firsts = order[::2][::3]  # two prefills per model per round (one timed, one building the decode's cache)
    assert firsts == ["a", "b", "c"]
    assert not rounds.compiled_ttft and not rounds.compiled_decode


def test_compiled_prompts_and_steps_are_compiled_before_the_rounds_and_timed_in_them(tiny_llama, calibration_ids,
                                                                                     monkeypatch):
    models = {"a": tiny_llama, "b": copy.deepcopy(tiny_llama)}
    prompts = []
    for name, model in models.items():  # the eager prompts (not the tracing of one for export)
        model.model.layers[0].register_forward_pre_hook(
            lambda _m, args, name=name: prompts.append(("eager", name))
            if args[0].shape[1] == SHORT.prompt_tokens and not torch.compiler.is_compiling() else None)
    exported = CompiledDecoder._prompt

    def counted(decoder, ids):
        program, name = exported(decoder, ids), next(n for n, m in models.items() if m is decoder.model)
        decoder.package_bytes = sizes[name]  # as an inductor package has it
        return lambda x: prompts.append(("compiled", name)) or program(x)

    sizes = {"a": 3_000_000, "b": 5_000_000}
    monkeypatch.setattr(CompiledDecoder, "_prompt", counted)
    settings = dataclasses.replace(SHORT, warmup=0, compiled="eager", compiled_prefill=True)
    rounds = interleaved_latency(models, calibration_ids[:1], "cpu", settings, 2)
    assert {n: len(t) for n, t in rounds.compiled_ttft.items()} == {"a": 2, "b": 2}
    assert rounds.package_bytes == sizes
    assert {n: len(t) for n, t in rounds.compiled_decode.items()} == {"a": 2, "b": 2}
    # with no warm-up asked, each compiled prompt still runs once before round 1
    assert prompts[:2] == [("compiled", "a"), ("compiled", "b")]
    # then per round and model: two eager prefills (one timed, one for the decode's cache), two compiled ones
    assert sorted(prompts[2:]) == sorted([(way, name) for way in ("eager", "compiled") for name in models] * 2 * 2)


def test_a_model_that_does_not_compile_keeps_its_eager_timings_and_says_why(tiny_llama, calibration_ids):
    """A runner without a C++ compiler (inductor's CPU backend needs one) loses the compiled figures, not the pass."""
    no_compiler = missing_compiler("\n(the compiler's own output)")
    models = {"a": tiny_llama, "b": copy.deepcopy(tiny_llama)}
    rounds = interleaved_latency(models, calibration_ids[:1], "cpu", dataclasses.replace(SHORT, compiled=no_compiler), 2)
    assert {n: len(t) for n, t in rounds.decode.items()} == {"a": 2, "b": 2} and not rounds.compiled_decode
    assert rounds.compile_failures == {name: "RuntimeError: no working C++ compiler found" for name in models}


def test_a_model_whose_prompt_does_not_export_keeps_its_compiled_decode_and_says_why(tiny_llama, calibration_ids,
                                                                                      monkeypatch):
    """A library's layer that torch.export refuses costs that model its compiled TTFT, nothing else."""
    models = {"a": tiny_llama, "b": copy.deepcopy(tiny_llama)}
    exported = CompiledDecoder._prompt

    def refusing(decoder, ids):
        if decoder.model is models["b"]:
            raise RuntimeError("cannot export this layer\n(the exporter's own output)")
        return exported(decoder, ids)

    monkeypatch.setattr(CompiledDecoder, "_prompt", refusing)
    settings = dataclasses.replace(SHORT, compiled="eager", compiled_prefill=True)
    rounds = interleaved_latency(models, calibration_ids[:1], "cpu", settings, 2)
    assert {n: len(t) for n, t in rounds.compiled_decode.items()} == {"a": 2, "b": 2}
    assert {n: len(t) for n, t in rounds.compiled_ttft.items()} == {"a": 2}
    assert rounds.prompt_failures == {"b": "RuntimeError: cannot export this layer"} and not rounds.compile_failures


def test_a_compiled_prefill_needs_a_compile_backend():
    with pytest.raises(ConfigError, match="compiled_prefill compiles with the `compiled` backend"):
        PerfSettings(compiled_prefill=True)


def test_a_speed_up_is_the_median_of_paired_round_ratios_with_their_range():
    baseline, quantized = [10.0, 20.0, 10.0, 12.0, 11.0], [5.0, 10.0, 5.5, 6.0, 5.0]  # round 2 was slow for both
    assert paired_speedup(baseline, quantized) == (2.0, 10.0 / 5.5, 2.2)


@pytest.mark.parametrize("speedup,busy,reason", [
    ((1.6, 1.2, 1.9), None, None),
    ((1.6, 1.55, 1.65), "machine busy (memory probe spread 40%)",
     "not measurable on this run: machine busy (memory probe spread 40%)"),
    ((1.05, 0.95, 1.15), None, "not measurable on this run: the rounds' ratios [0.95, 1.15] reach 1"),
    ((0.7, 0.6, 0.8), None, None),  # slower, measurably
])
def test_a_speed_up_is_withheld_when_the_machine_was_busy_or_its_rounds_reach_1(speedup, busy, reason):
    assert unmeasurable_reason(speedup, busy) == reason


def test_a_busy_round_is_one_where_other_processes_took_the_cpus():
    quiet = Rounds({}, {}, [10e9, 11e9, 10.5e9], [0.02, 0.04, 0.01])
    assert quiet.busy_reason() is None
    assert "other processes took 45% of the CPUs" in Rounds({}, {}, [10e9] * 3, [0.02, 0.45, 0.01]).busy_reason()
    assert "memory probe spread 50%" in Rounds({}, {}, [10e9, 5e9, 10e9], [None] * 3).busy_reason()
    # where the CPU share is known it decides: a quiet VM's memory probe moves that much on its own
    assert Rounds({}, {}, [10e9, 5e9, 10e9], [0.01, 0.02, 0.01]).busy_reason() is None


def test_other_processes_cpu_time_is_read_apart_from_this_ones():
    """CPU seconds, not shares, so that neither the CPU count nor other load on the runner moves the test: this
    process's own work is counted as its own, a child process's work as the machine's."""
    before, spent = cpu_seconds(), os.times().user
    while os.times().user - spent < 0.3:
        pass
    after = cpu_seconds()
    assert after[2] - before[2] >= 0.3
    before = cpu_seconds()
    subprocess.run([sys.executable, "-c", "import os\nwhile os.times().user < 0.5: pass"], check=True)
    after = cpu_seconds()
    assert (after[0] - before[0]) - (after[2] - before[2]) >= 0.4  # the child's 0.5 s, less the clock's ticks
    assert others_share(before, after) > 0
