"""The study's three architectures on the CPU: small random-weight replicas built from each model's own
configuration class, saved as hub checkpoints and loaded through QUANT_MODEL_<NAME> (the path a GPU runner with
local weights takes), then quantized by every method, saved and restored, run on the fast kernels, evaluated by
the real evaluators, and restored from the cache onto another device."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_model

from quant.cache import key_of
from quant.cli import main
from quant.config import QuantConfig
from quant.kernels import use_fast_kernels
from quant.matrix import load_matrix
from quant.methods import METHODS, get_method
from quant.methods.gsq import SCALING_GROUPS, foldable, scale_group
from quant.models import load_model
from quant.backends.inhouse import restore_quantized
from quant.compiled import CompiledDecoder
from quant.pipeline import Workbench
from quant.qlinear import QuantLinear
from tests.helpers.meta_device import META, KernelCalls, devices
from tests.helpers.rounding import (assert_greedy_choices, assert_same_hessians, assert_same_up_to_rounding, decoded,
                            eager_greedy, gptq_hessians, varied)
from tests.helpers.rounding import KERNEL_RELATIVE_TOLERANCE
from tests.helpers.matrices import edited_matrix
from tests.helpers.models import CALIBRATED_METHODS

# The small replicas' input widths are 192 and 512: g64 divides both, g128 only 512 (192 falls back to g64).
GROUP_SIZES = {64: set(), 128: {192}}


@pytest.fixture
def replica(replica_folder, monkeypatch):
    """(model spec, model, tokenizer) loaded from the saved replica through the matrix's own model entry."""
    name, folder = replica_folder
    spec = load_matrix().models[name]
    monkeypatch.setenv(spec.override_env, str(folder))
    model, tokenizer = load_model(spec)
    return spec, model, tokenizer


def _calibration(tokenizer, data_dir) -> torch.Tensor:
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:20_000]
    ids = torch.tensor(tokenizer(text).input_ids)
    return ids[: 4 * 128].view(4, 128)


def test_replica_is_the_study_architecture_loaded_from_a_local_folder(replica, replica_folder):
    spec, model, tokenizer = replica
    config = model.config
    assert config.name_or_path == str(replica_folder[1]) and model.dtype == torch.bfloat16  # the matrix's dtype
    attention = model.model.layers[0].self_attn
    if spec.name == "phi-1.5":
        assert config.rope_parameters["partial_rotary_factor"] == 0.5 and attention.rotary_ndims < attention.head_dim
        assert model.lm_head.bias is not None and not config.tie_word_embeddings
        assert not hasattr(model.model.layers[0], "post_attention_layernorm")  # attention and MLP in parallel
    else:
        assert attention.k_proj.out_features < attention.q_proj.out_features  # grouped-query attention
        assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    if spec.name == "llama-3.2-1b":
        assert config.rope_parameters["rope_type"] == "llama3"
    if spec.name == "qwen2.5-0.5b":
        assert all(getattr(attention, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))


@pytest.mark.float_sensitive
@pytest.mark.parametrize("group_size", sorted(GROUP_SIZES))
@pytest.mark.parametrize("method", sorted(METHODS))
@torch.no_grad()
def test_every_method_quantizes_saves_restores_and_runs_fast(replica, method, group_size, tmp_path, shared_data):
    spec, baseline, tokenizer = replica
    calibration = _calibration(tokenizer, shared_data)
    model = copy.deepcopy(baseline)
    config = QuantConfig(method=method, bits=4, group_size=group_size)
    records = get_method(method).quantize(model, config, calibration)
    linears = [r for r in records if r.bits == 4]
    assert len(linears) == len(records) == 2 * (7 if spec.name != "phi-1.5" else 6)
    fallbacks = {r.shape[1] for r in records if r.fallback}
    assert fallbacks == GROUP_SIZES[group_size], [(r.name, r.fallback) for r in records]
    assert all(r.group_size == 64 for r in records if r.fallback)
    assert devices(model) == {torch.device("cpu")}

    save_model(model, str(tmp_path / "model.safetensors"))
    restored = restore_quantized(baseline, records, tmp_path / "model.safetensors")
    original, reloaded = model.state_dict(), restored.state_dict()
    assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)
    ids = calibration[:2, :64]
    reference = restored(ids).logits.float()
    assert torch.equal(model(ids).logits.float(), reference)

    fast = copy.deepcopy(restored)
    plan = use_fast_kernels(fast)
    assert plan.fast_layers == len(linears) and not plan.reference_layers
    difference = (fast(ids).logits.float() - reference).abs().max()
    assert difference <= KERNEL_RELATIVE_TOLERANCE * reference.abs().max(), float(difference)


def block_batches(model: torch.nn.Module) -> tuple[list[int], list]:
    """The batch size of every decoder-block forward from now on (seen at its first module: the walk's capture of
    the first block's inputs stops before it), and the hook handles to remove."""
    batches: list[int] = []
    handles = [block.input_layernorm.register_forward_pre_hook(lambda _norm, args: batches.append(args[0].shape[0]))
               for block in model.model.layers]
    return batches, handles


@pytest.mark.float_sensitive
@pytest.mark.parametrize("method", CALIBRATED_METHODS)
@torch.no_grad()
def test_calibration_in_chunks_gives_the_same_model_with_smaller_forwards(replica, method, shared_data):
    """Chunks bound each block forward's batch. The bf16 block forward may round differently for another number of
    rows (AMX kernels do), so the chunked build is the unchunked one up to rounding (tests/helpers/rounding.py): GPTQ's
    Hessians average the same tokens and are close, most codes are equal, and the models are close."""
    spec, baseline, tokenizer = replica
    calibration = _calibration(tokenizer, shared_data)  # 4 samples: chunks of 3 leave an uneven last one
    built, hessians = {}, {}
    for chunk in (None, 3, 1):
        model = copy.deepcopy(baseline)
        batches, handles = block_batches(model)
        with gptq_hessians() as hessians[chunk]:
            get_method(method).quantize(model, QuantConfig(method=method, group_size=64, calib_chunk=chunk), calibration)
        for handle in handles:
            handle.remove()
        assert max(batches) == (chunk or len(calibration))
        built[chunk] = model
    ids = _calibration(tokenizer, shared_data)[:2, :64]
    for chunk in (3, 1):
        assert_same_hessians(hessians[None], hessians[chunk], f"calib_chunk={chunk}")
        assert_same_up_to_rounding(baseline, built[None], built[chunk], ids, f"calib_chunk={chunk}")


@torch.no_grad()
def test_gsq_folding_leaves_the_function_unchanged_before_rounding(replica, shared_data):
    """Every scaling group of the architecture's table, scaled by a random s: W diag(s) with 1/s folded into the
    preceding norm or linear, or divided out of the input where it cannot fold, computes the same logits."""
    spec, baseline, tokenizer = replica
    model = copy.deepcopy(baseline).float()
    ids = _calibration(tokenizer, shared_data)[:2, :64]
    before = model(ids).logits
    generator = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        for group in SCALING_GROUPS[model.config.model_type]:
            width = block.get_submodule(group.linears[0]).in_features
            scale = torch.rand(width, generator=generator) + 0.5
            fold = foldable(block, group, list(group.linears))
            scale_group(block, group, list(group.linears), scale, fold)
            if not fold:
                for name in group.linears:
                    block.get_submodule(name).register_forward_pre_hook(
                        lambda _m, args, s=scale: (args[0] / s.to(args[0].dtype),))
    after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_workbench_gates_a_replica_and_restores_it_onto_the_baselines_device(replica, shared_data, tmp_path,
                                                                                monkeypatch):
    """The pipeline a GPU runner runs, on the CPU: a GPU-tier case's baseline and GPTQ model evaluated by the real
    perplexity and choice evaluators and judged; then a second workbench whose device is ``meta`` restores the
    folder built on the CPU and serves it on the fast path, every tensor on that device. (It would build its own:
    a quantized model's key holds the device it is built on.)"""
    spec, _, _ = replica
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path))
    matrix = load_matrix()
    matrix = dataclasses.replace(matrix, profiles={"replica": {"gpu": {
        "boolq": 4, "wikitext": 2, "calib_samples": 4, "options": {"wikitext": {"window": 128}}}}})
    workbench = Workbench(matrix, "replica", shared_data)
    for task in ("wikitext", "boolq"):
        case = next(c for c in matrix.cases if c.id == f"{spec.name}-gptq-w4g128-{task}")
        comparison = workbench.compare(case)
        assert comparison.baseline.n == comparison.quantized.n == {"wikitext": 2, "boolq": 4}[task]
        assert torch.isfinite(torch.tensor(list(comparison.quantized.metrics.values()))).all()
    assert "mean_kld" in workbench.evaluate(spec, "wikitext", "gptq-w4g128").metrics

    elsewhere = Workbench(matrix, "replica", shared_data, device="meta")
    baseline, _ = elsewhere.baseline(spec)
    baseline.tie_weights()  # (a move to meta unties them; a move to CUDA keeps them)
    config = workbench.calibration_config(spec, matrix.quant["gptq-w4g128"])
    built = tmp_path / "quantized" / key_of(workbench.candidates.parts(spec, config))
    assert key_of(elsewhere.candidates.parts(spec, config)) != built.name
    restored = elsewhere.candidates.load(spec, config, built, None).model
    assert any(isinstance(m, QuantLinear) for m in restored.modules())
    assert devices(restored) == {META}
    KernelCalls(monkeypatch)
    served = copy.deepcopy(restored)  # as Workbench.runnable serves a quantized model
    assert devices(served) == {META} and use_fast_kernels(served).describe().startswith("fake meta kernel")


def test_the_replica_command_saves_a_folder_the_matrix_model_loads(small_tokenizer, tmp_path, monkeypatch, capsys):
    small_tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert main(["replica", "qwen2.5-0.5b", "--small", "--tokenizer", str(tmp_path / "tokenizer"),
                 "--out", str(tmp_path / "qwen")]) == 0
    assert "QUANT_MODEL_QWEN2_5_0_5B=" in capsys.readouterr().out
    spec = load_matrix().models["qwen2.5-0.5b"]
    monkeypatch.setenv(spec.override_env, str(tmp_path / "qwen"))
    model, tokenizer = load_model(spec)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer) == 512


@pytest.fixture
def small_llama(small_tokenizer, shared_data, tmp_path, monkeypatch) -> list[str]:
    """A small llama replica as QUANT_MODEL_LLAMA_3_2_1B, and the CLI arguments of a matrix whose profile
    ``replica`` times it and measures it briefly."""
    small_tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert main(["replica", "llama-3.2-1b", "--small", "--tokenizer", str(tmp_path / "tokenizer"),
                 "--out", str(tmp_path / "llama")]) == 0
    monkeypatch.setenv("QUANT_MODEL_LLAMA_3_2_1B", str(tmp_path / "llama"))
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "cache"))
    def replica_profile(raw):
        raw["profiles"]["replica"] = {"gpu": {"wikitext": 2, "perf": {
            "prompt_tokens": 16, "new_tokens": 4, "batch": 2, "batch_prompt_tokens": 8, "batch_new_tokens": 2,
            "warmup": 1, "repeats": 1, "rounds": 2}}}

    return ["--profile", "replica", "--matrix", str(edited_matrix(tmp_path, replica_profile)), "--data-dir", str(shared_data),
            "--out", str(tmp_path)]


def test_the_perf_command_times_each_variant_eager_and_compiled(small_llama, tmp_path, capsys):
    """``quant perf`` on a small replica: the baseline and an int4 config side by side, eager and on the static-cache
    path (the eager backend: the same path without compiling), each against the measured bandwidth."""
    assert main(["perf", "llama-3.2-1b", "--quant", "rtn-w4g128", "--quant", "rtn-w4g128-head8", "--compiled", "eager",
                 "--compiled-prefill", *small_llama]) == 0
    out = capsys.readouterr().out
    assert "compiled decode ms/token" in out and "compiled TTFT ms" in out and "aten._weight_int4pack_mm_for_cpu" in out
    assert "aten._weight_int8pack_mm" in out  # the 8-bit output projection
    written = json.loads((tmp_path / "perf-llama-3.2-1b.json").read_text())
    rows = {row["quant"]: row for row in written["performance"]}
    assert list(rows) == ["baseline", "rtn-w4g128", "rtn-w4g128-head8"]  # a bf16 replica has no recast baseline
    # the tied bf16 matrix is read whole by the int4 model's lm_head; with an int8 head, one row of it per token
    assert rows["rtn-w4g128-head8"]["bytes_per_token"] < rows["rtn-w4g128"]["bytes_per_token"]
    for row in rows.values():
        assert row["compiled_decode_ms_per_token"] > 0 and 0 < row["compiled_bandwidth_share"]
        assert row["settings"]["compiled"] == "eager"
    assert rows["rtn-w4g128"]["memory_reduction"] > 2 and written["machine"]["memory_bandwidth_gb_per_s"] > 0
    for row in rows.values():  # timed interleaved: every variant once per round, a speed-up or why there is none
        assert len(row["decode_ms_per_token_rounds"]) == len(row["ttft_ms_rounds"]) == len(row["compiled_ttft_ms_rounds"]) == 2
        assert len(row["compiled_decode_ms_per_token_rounds"]) == 2 and row["compiled_ttft_ms"] > 0
        for speedup in ("decode_speedup", "compiled_decode_speedup"):
            assert (row[speedup] is None) == bool(row[f"{speedup}_unmeasurable"])


def test_the_perf_command_refuses_compile_options_without_their_backend(small_llama, capsys):
    assert main(["perf", "llama-3.2-1b", "--compiled", "eager", "--cpp-wrapper", *small_llama]) == 2
    assert "--cpp-wrapper is inductor's" in capsys.readouterr().err
    assert main(["perf", "llama-3.2-1b", "--compiled", "none", "--compiled-prefill", *small_llama]) == 2
    assert "--compiled-prefill compiles with the --compiled backend" in capsys.readouterr().err


def test_the_sensitivity_command_ranks_every_linear_and_proposes_a_mixed_config(small_llama, tmp_path, capsys):
    assert main(["sensitivity", "llama-3.2-1b", "--budget", "0.5", *small_llama]) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "sensitivity-llama-3.2-1b-rtn-w4g128.json").read_text())
    klds = [row["mean_kld"] for row in written["ranking"]]
    assert len(klds) == 14 and klds == sorted(klds, reverse=True) and written["windows"] == 2
    assert (tmp_path / "sensitivity-llama-3.2-1b-rtn-w4g128.png").stat().st_size > 1000
    overrides = written["mixed_precision_overrides"]
    assert overrides and written["ranking"][0]["name"] in overrides
    assert "rtn-w4g128-mixed: " in out and f"{len(overrides)} linears at 8 bits" in out


@pytest.mark.float_sensitive
def test_the_static_cache_decode_generates_the_eager_loops_tokens_on_each_architecture(replica):
    """The compiled decoder's path (a static cache; on the CPU attention on the shared key/value heads), run by the
    eager backend, against the eager loop on a dynamic cache: llama and qwen2 share heads, phi does not."""
    model = varied(replica[1].float())
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # a constant continuation would hide a wrong cache position
    assert len(set(eager_greedy(model, ids, 12)[0].tolist())) > 3
    decoder = CompiledDecoder(model, "cpu", backend="eager")
    assert_greedy_choices(model, ids, decoded(decoder, ids, 12))


def test_continuations_scored_from_kept_logits_equal_a_full_forward_each(replica):
    """The choice and rerank evaluators ask each architecture for logits only where continuations are read
    (``logits_to_keep``, per row of a right-padded batch); against one full forward per (context, continuation):
    the same log-likelihoods, for one-token and multi-token continuations of different lengths in one batch."""
    from quant.kinds.lm import continuation_logprobs, text_prefix

    _, model, tokenizer = replica
    model.float()  # in bf16, batch composition alone moves these sums by ~2e-3; in float32 by ~1e-5
    requests = [("The tower is", [" tall", " in the city of Paris"]), ("A", [" b"]),
                ("Rivers run to the sea and the sea is never full", [" of water", " again"])]
    scores = continuation_logprobs(model, tokenizer, requests, batch_size=3, label="")
    prefix = text_prefix(tokenizer)
    for (context, continuations), got in zip(requests, scores):
        for continuation, score in zip(continuations, got):
            ctx = prefix + tokenizer(context, add_special_tokens=False).input_ids
            cont = tokenizer(continuation, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
            expected = float(logprobs[torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)].sum())
            assert score == pytest.approx(expected, abs=1e-4), (context, continuation)


def test_variants_evaluated_together_share_the_baseline_forward_and_get_what_each_gets_alone(
        replica, shared_data, tmp_path, monkeypatch):
    """The report evaluates a model's WikiText variants in one pass: one baseline forward per batch for all of
    them (KLD needs the baseline's distribution), and each cached result equal to the one it gets alone."""
    spec, _, _ = replica
    matrix = load_matrix()
    matrix = dataclasses.replace(matrix, profiles={"replica": {"gpu": {
        "wikitext": 4, "calib_samples": 4, "options": {"wikitext": {"window": 128, "batch_size": 2}}}}})
    variants = ["rtn-w4g128", "rtn-w8", "rtn-w4g32-asym"]
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "together"))
    together = Workbench(matrix, "replica", shared_data)
    baseline, _ = together.baseline(spec)
    for quant_name in variants:  # built first: a model deep-copied from the baseline would carry the hook below
        together.quantized(spec, quant_name, matrix.quant[quant_name])
    forwards = []
    handle = baseline.base_model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        together.evaluate_together(spec, "wikitext", variants)
    finally:
        handle.remove()
    assert len(forwards) == 2  # 4 windows in batches of 2, once for the three variants
    # the baseline's own result came from the same forwards
    assert together.results.cached(spec, "wikitext")
    joint = {q: together.evaluate(spec, "wikitext", q) for q in [*variants, None]}  # read back from the cache
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "alone"))
    alone = Workbench(matrix, "replica", shared_data)
    for quant_name in [*variants, None]:
        result = alone.evaluate(spec, "wikitext", quant_name)
        assert result.metrics == joint[quant_name].metrics and result.items == joint[quant_name].items, quant_name
    assert len({joint[q].metrics["mean_kld"] for q in variants}) == 3  # three different models, not one thrice


@torch.no_grad()
def test_perplexity_and_kld_from_chunked_logits_equal_a_full_forward(replica):
    """WikiText's evaluator runs each architecture's trunk, then its output projection (a bias on phi-1.5) 32
    positions at a time; against the logits of a plain forward: the same NLL per window, KLD per token and
    same-top-token count, for windows longer than a chunk and not a multiple of it."""
    from quant.kinds.perplexity import KIND, full_kld, perplexity_windows
    from quant.tasks import TaskSpec

    _, model, tokenizer = replica
    model.float()
    noisy = copy.deepcopy(model)
    head = noisy.get_output_embeddings()
    head.weight.add_(0.02 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    task = TaskSpec("wikitext", "wikitext", "perplexity", {"window": 100, "batch_size": 2, "metrics": ["perplexity"]})
    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 40
    result = KIND.evaluate(noisy, tokenizer, task, [{"id": "t", "text": text}], span=range(3), label="", reference_model=model)
    ids = torch.stack(perplexity_windows(tokenizer, text, 100)[:3])
    base, logprobs = (torch.log_softmax(m(ids).logits[:, :-1].float(), -1) for m in (model, noisy))
    nll = -logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    assert [r["nll"] for r in result.items] == pytest.approx(nll.tolist(), rel=1e-5)
    kld = torch.tensor([r["kld_tokens"] for r in result.items])
    torch.testing.assert_close(kld, full_kld(base, logprobs), rtol=1e-3, atol=2e-6)
    assert [r["same_top"] for r in result.items] == (base.argmax(-1) == logprobs.argmax(-1)).sum(-1).tolist()


@pytest.mark.parametrize("replica_folder", ["llama-3.2-1b"], indirect=True)
def test_a_build_records_its_peak_memory_above_what_the_process_held(replica, shared_data, tmp_path, monkeypatch):
    """Quantizing records its peak memory above what the process held when it started: the peak counter is reset
    before the build and read after it (here a counter that the build itself raises by 64 MB, since a real
    allocation may reuse freed pages and not move the resident set); a backend that builds in a subprocess records
    nothing rather than this process's figure."""
    from quant import memory
    from quant.backends.inhouse import InHouse

    spec, _, _ = replica
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path))
    workbench = Workbench(load_matrix(), "test", shared_data)
    workbench.baseline(spec)
    counter = {"held": 1000e6, "peak": 0.0}

    def peak_memory(device, reset=False):
        if reset:
            counter["peak"] = counter["held"]
        return int(counter["peak"])

    monkeypatch.setattr(memory, "memory_in_use", lambda device: int(counter["held"]))
    monkeypatch.setattr(memory, "peak_memory", peak_memory)
    original = InHouse.quantize

    def heavier(self, *args):
        counter["peak"] += 64e6  # what this build adds on top of the reset peak
        return original(self, *args)

    monkeypatch.setattr(InHouse, "quantize", heavier)
    built = workbench.quantized(spec, "rtn-w4g128", workbench.settings.matrix.quant["rtn-w4g128"])
    assert built.quantize_peak_bytes == 64e6
    monkeypatch.setattr(InHouse, "runs_in_process", False)
    assert workbench.quantized(spec, "rtn-w8", workbench.settings.matrix.quant["rtn-w8"]).quantize_peak_bytes is None
