"""End-to-end properties on the embedded model (smollm2-135m), sharing the matrix tests' cached results."""
import copy

import torch

from quant.qlinear import QuantLinear, model_bytes
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


@torch.no_grad()
def test_a_broken_quantizer_fails_the_gate(matrix, workbench):
    """Scales doubled after quantization (a classic packing bug): the suite's own gate must catch it."""
    case = _case(matrix, "rtn-w4g128", "wikitext")
    broken = copy.deepcopy(workbench.quantized(case.model, case.quant_name, case.quant).model)
    for module in broken.modules():
        if isinstance(module, QuantLinear):
            module.scales.mul_(2)
    _, tokenizer = workbench.baseline(case.model)
    task = workbench.task(case.model, "wikitext")
    limit = workbench.limits(case.model)["wikitext"]
    baseline = workbench.evaluate(case.model, "wikitext")
    result = evaluate(broken, tokenizer, task, workbench.items(case.model, "wikitext"), limit=limit, reference=baseline)
    verdict = workbench.judge(case, baseline, result).verdict
    assert verdict.failed, verdict.reason


def test_packed_weights_hold_the_memory_they_claim(matrix, workbench):
    spec = matrix.models[MODEL]
    baseline, _ = workbench.baseline(spec)
    quantized = workbench.quantized(spec, "rtn-w4g128", matrix.quant["rtn-w4g128"]).model
    layers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    bytes_per_weight = sum(model_bytes(m) for m in layers) / weights
    assert bytes_per_weight <= 0.585  # within 10% of the ideal 4.25 bits (issue #4)
    assert model_bytes(baseline) / model_bytes(quantized) >= 3.0  # embeddings stay fp32
