"""End-to-end properties on the embedded model (smollm2-135m), sharing the matrix tests' cached results."""
import copy
import dataclasses
import inspect
import json

import pytest
import torch

from quant import gate
from quant.cache import cached_json, has_entry
from quant.config import ConfigError
from quant.pipeline import Workbench
from quant.qlinear import QuantLinear, model_bytes, pack_bits
from quant.snapshots import regressions
from tests.helpers.repo import BASELINES
from quant.kinds.lm import text_prefix
from quant.kinds import kind_of
from quant.tasks import evaluate

MODEL = "smollm2-135m"


def _case(matrix, quant, task):
    return next(c for c in matrix.cases if c.id == f"{MODEL}-{quant}-{task}")


def test_gptq_and_gsq_beat_round_to_nearest_on_wikitext(matrix, workbench):
    spec = matrix.models[MODEL]
    perplexity = {q: workbench.evaluate(spec, "wikitext", q).metrics["perplexity"]
                  for q in ("rtn-w4g128", "gptq-w4g128", "gsq-w4g128")}
    assert perplexity["gptq-w4g128"] < perplexity["rtn-w4g128"], perplexity
    assert perplexity["gsq-w4g128"] < perplexity["rtn-w4g128"], perplexity


def _double_scales(layer: QuantLinear) -> None:
    layer.scales.mul_(2)


def _round_down(layer: QuantLinear) -> None:
    """Codes off by one step wherever rounding should have gone up (floor instead of round, roughly half)."""
    codes = layer.codes().int()
    generator = torch.Generator().manual_seed(0)
    up = torch.rand(codes.shape, generator=generator) < 0.5
    layer.qweight.copy_(pack_bits((codes - up.int()).clamp(min=0), layer.bits))


def _transpose_groups(layer: QuantLinear) -> None:
    """Each group dequantized with another group's scale (group order reversed)."""
    layer.scales.copy_(layer.scales.flip(1))


def _zero_point_off_by_one(layer: QuantLinear) -> None:
    layer.qzeros.copy_(pack_bits((layer.zeros() + 1).clamp(max=2**layer.bits - 1), layer.bits))


def _permutation_not_undone(layer: QuantLinear) -> None:
    """Columns left in a permuted order, as when an act-order permutation is not undone."""
    permutation = torch.randperm(layer.in_features, generator=torch.Generator().manual_seed(0))
    layer.qweight.copy_(pack_bits(layer.codes()[:, permutation], layer.bits))


INJECTED_BUGS = {"doubled-scales": ("rtn-w4g128", _double_scales), "wrong-rounding": ("rtn-w4g128", _round_down),
                 "transposed-groups": ("rtn-w4g128", _transpose_groups),
                 "zero-point-off-by-one": ("rtn-w4g32-asym", _zero_point_off_by_one),
                 "permutation-not-undone": ("rtn-w4g128", _permutation_not_undone)}


@pytest.fixture(scope="module")
@torch.no_grad()
def broken_wikitext_results(matrix, workbench) -> dict:
    """Each injected bug's packed model evaluated on the test profile's WikiText windows, all of them beside one
    baseline forward per window (``evaluate_models``: each result is the one the model gets alone). Cached like a
    matrix result, keyed also by the bug's source: the gate judged on them is not in the key, so a change to it
    reruns these tests in seconds."""
    spec = matrix.models[MODEL]
    task = workbench.task(spec, "wikitext")
    kind = kind_of(task)
    span = range(workbench.limits(spec)["wikitext"])
    parts = {name: {**workbench.results.span_parts(spec, "wikitext", quant, span), "bug": inspect.getsource(bug)}
             for name, (quant, bug) in INJECTED_BUGS.items()}
    missing = [name for name in INJECTED_BUGS if not has_entry("results", parts[name])]
    fresh = {}
    if missing:
        broken = []
        for name in missing:
            quant, bug = INJECTED_BUGS[name]
            broken.append(copy.deepcopy(workbench.quantized(spec, quant, matrix.quant[quant]).model))
            for module in broken[-1].modules():
                if isinstance(module, QuantLinear):
                    bug(module)
        baseline_model, tokenizer = workbench.baseline(spec)
        fresh = dict(zip(missing, kind.evaluate_models(broken, tokenizer, task,
                                                       kind.span_items(workbench.items(spec, "wikitext"), span), span,
                                                       "wikitext [bugs]", reference_model=baseline_model)))
    return {name: kind.summarize(task, cached_json("results", parts[name], lambda name=name: fresh[name].items))
            for name in INJECTED_BUGS}


@pytest.mark.parametrize("bug", sorted(INJECTED_BUGS))
def test_an_injected_quantizer_bug_fails_the_gate(matrix, workbench, broken_wikitext_results, bug):
    """Known quantizer bugs injected into the packed model: the suite's own WikiText gate must catch each, and so
    must the committed snapshot of the case, with the old and new perplexity and the tolerance in its message."""
    case = _case(matrix, INJECTED_BUGS[bug][0], "wikitext")
    result = broken_wikitext_results[bug]
    comparison = gate.judge(case, workbench.evaluate(case.model, "wikitext"), result)
    assert comparison.verdict.failed, comparison.verdict.reason
    stored_file = BASELINES / "cpu" / workbench.settings.profile / "test_matrix.json"
    stored = json.loads(stored_file.read_text())[f"test_snapshot[{case.id}]"]
    problems = regressions(stored, workbench.snapshot(case, result))
    perplexity = [p for p in problems if p.startswith("quantized.perplexity: ")]
    assert perplexity and "tolerance" in perplexity[0], problems


def test_packed_weights_hold_the_memory_they_claim(matrix, workbench):
    spec = matrix.models[MODEL]
    baseline, _ = workbench.baseline(spec)
    quantized = workbench.quantized(spec, "rtn-w4g128", matrix.quant["rtn-w4g128"]).model
    layers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    bytes_per_weight = sum(model_bytes(m) for m in layers) / weights
    assert bytes_per_weight <= 0.585  # within 10% of the ideal 4.25 bits (issue #4)
    assert model_bytes(baseline) / model_bytes(quantized) >= 3.0  # embeddings stay fp32


@torch.no_grad()
def test_quantize_and_evaluate_again_gives_identical_metrics(matrix, workbench):
    """The pipeline rerun from scratch (no cache) reproduces the cached result exactly, so gates do not flap."""
    from quant.methods import get_method
    from quant.qlinear import dequantized_weights

    case = _case(matrix, "rtn-w4g128", "wikitext")
    baseline_model, tokenizer = workbench.baseline(case.model)
    model = copy.deepcopy(baseline_model)
    get_method("rtn").quantize(model, case.quant)
    task = workbench.task(case.model, "wikitext")
    with dequantized_weights(model):
        again = evaluate(model, tokenizer, task, workbench.items(case.model, "wikitext"),
                         span=range(workbench.limits(case.model)["wikitext"]), reference_model=baseline_model)
    cached = workbench.evaluate(case.model, "wikitext", case.quant_name)
    assert again.metrics == cached.metrics
    assert again.items == cached.items


@torch.no_grad()
def test_fast_int4_path_serves_the_same_model(matrix, workbench):
    """smollm2 on the int4 kernels (bf16 activations) against the fp32 reference it was evaluated with, on 256
    WikiText tokens. Measured 2026-11-25: mean KLD 0.0016, same top token 0.961; bounds leave headroom."""
    spec = matrix.models[MODEL]
    reference = workbench.quantized(spec, "rtn-w4g128", matrix.quant["rtn-w4g128"]).model
    fast, kernel = workbench.runnable(spec, "rtn-w4g128")
    assert "_weight_int4pack_mm" in kernel and "reference" not in kernel  # every layer on the fast path
    ids = workbench.wikitext_ids(spec)[None, :256]
    expected = torch.log_softmax(reference(ids).logits.float(), -1)
    served = torch.log_softmax(fast(ids).logits.float(), -1)
    kld = (served.exp() * (served - expected)).sum(-1)
    assert kld.mean() <= 0.005, float(kld.mean())
    assert (served.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.93


def test_evaluation_windows_that_would_reach_the_calibration_text_are_refused(matrix, workbench):
    """Perplexity scores the first WikiText windows, calibration draws from the second half: a profile whose
    windows reach it (here 600 of 512 tokens: more than the whole text) is refused, naming the field to lower."""
    spec = matrix.models["smollm2-135m"]
    profiles = copy.deepcopy(matrix.profiles)
    profiles[workbench.settings.profile]["cpu"]["wikitext"] = 600
    crowded = Workbench(dataclasses.replace(matrix, profiles=profiles), workbench.settings.profile,
                        workbench.settings.data_dir)
    crowded.models._baselines = workbench.models._baselines  # the loaded model, not a second copy
    config = matrix.quant["gptq-w4g128"]
    with pytest.raises(ConfigError, match=rf"profiles\.{workbench.settings.profile}\.cpu\.wikitext = 600 windows of 512 "
                                          r"tokens would reach the calibration half .*: at most \d+ windows"):
        crowded.calibration(spec, config)
    assert workbench.calibration(spec, workbench.calibration_config(spec, config)).shape[1] == 512


def test_choice_items_take_one_forward_and_score_as_one_forward_per_choice(matrix, workbench):
    """BoolQ's " no" / " yes" are one token each: one forward of the context scores both. Against a forward of
    context + choice per choice (the way lm-eval and the evaluator before it scored them): the same predictions,
    log-likelihoods within 1e-5, and half the forwards."""
    spec = matrix.models[MODEL]
    model, tokenizer = workbench.baseline(spec)
    # One sequence per batch, as the reference runs them: batch composition alone moves float32 sums by ~1e-5.
    boolq = workbench.task(spec, "boolq")
    task = dataclasses.replace(boolq, options={**boolq.options, "batch_size": 1})
    items = workbench.items(spec, "boolq")[:8]
    forwards = []
    handle = model.register_forward_hook(lambda module, args, kwargs, output: forwards.append(args[0].shape[0]),
                                         with_kwargs=True)
    try:
        result = evaluate(model, tokenizer, task, items)
    finally:
        handle.remove()
    assert sum(forwards) == len(items)
    prefix = text_prefix(tokenizer)
    for item, record in zip(items, result.items):
        context = prefix + tokenizer(task["prompt"].format(**item), add_special_tokens=False).input_ids
        reference = []
        for choice in task["choices"]:
            (token,) = tokenizer(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([context + [token]])).logits[0, len(context) - 1].float()
            reference.append(float(torch.log_softmax(logits, -1)[token]))
        assert record["prediction"] == max(range(len(reference)), key=reference.__getitem__)
        assert record["logprobs"] == pytest.approx(reference, abs=1e-5)


def test_gsm8k_reuses_the_few_shot_prefix_and_generates_what_the_full_prefill_does(matrix, workbench):
    """The five exemplars' KV cache is computed once and copied into each batch; the generations are the ones a
    prefill of every whole prompt gives (measured on 8 report items x 64 tokens: 8 of 8 identical)."""
    spec = matrix.models[MODEL]
    model, tokenizer = workbench.baseline(spec)
    gsm8k = workbench.task(spec, "gsm8k")
    items = workbench.items(spec, "gsm8k")[:3]
    forwards = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: forwards.append((args[0] if args else kwargs["input_ids"]).shape),
        with_kwargs=True)
    outputs = {}
    try:
        for shared in (True, False):
            task = dataclasses.replace(gsm8k, options={**gsm8k.options, "max_new_tokens": 12, "batch_size": 2,
                                                       "shared_prefix_cache": shared})
            forwards.clear()
            outputs[shared] = [record["output"] for record in evaluate(model, tokenizer, task, items).items]
            if shared:  # one forward of the prefix, then each batch prefills only the questions
                prefix_tokens, first_batch = forwards[0][1], forwards[1][1]
                assert forwards[0][0] == 1 and prefix_tokens > 500 and first_batch < 200
    finally:
        handle.remove()
    assert outputs[True] == outputs[False] and all(outputs[True])
