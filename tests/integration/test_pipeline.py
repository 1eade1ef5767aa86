"""The wiring of a case (quant/pipeline.py): a sequential gate evaluates span by span and stops at the look that
decides it; a longer run extends the cached spans; ``sequential: false`` reads every item. On a small random-weight
Llama replica and 64-token WikiText windows, so that the 32 windows of two looks take seconds."""
from __future__ import annotations

import dataclasses

import pytest

from quant import stores
from quant.matrix import load_matrix
from quant.pipeline import Workbench
from quant.qlinear import dequantized_weights
from quant.replicas import save_replica

MODEL = "llama-3.2-1b"


@pytest.fixture
def two_looks(small_tokenizer, shared_data, tmp_path, monkeypatch):
    """(workbench, case) for the replica's rtn-w4g128 WikiText case in a profile of 32 windows: looks at 16 and 32."""
    matrix = load_matrix()
    spec = matrix.models[MODEL]
    monkeypatch.setenv(spec.override_env, str(save_replica(MODEL, small_tokenizer, tmp_path / "weights", small=True)))
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "cache"))
    matrix = dataclasses.replace(matrix, profiles={"two-looks": {"gpu": {
        "wikitext": 32, "options": {"wikitext": {"window": 64, "batch_size": 8}}}}})
    case = next(c for c in matrix.cases if c.id == f"{MODEL}-rtn-w4g128-wikitext")
    return Workbench(matrix, "two-looks", shared_data), case


def _spans_evaluated(monkeypatch) -> list[range]:
    spans = []
    evaluate = stores.evaluate

    def counted(model, tokenizer, task, items, span=None, **kwargs):
        spans.append(span)
        return evaluate(model, tokenizer, task, items, span, **kwargs)

    monkeypatch.setattr(stores, "evaluate", counted)
    return spans


def _with_gate(case, **fields):
    return dataclasses.replace(case, gate={**case.gate, **fields})


def test_a_clear_verdict_stops_at_the_first_look_and_a_longer_run_extends_the_cache(two_looks, monkeypatch):
    workbench, case = two_looks
    spans = _spans_evaluated(monkeypatch)
    # the replica's 4-bit perplexity ratio is about 1.006: far inside 10x at the first look; within 1.02 it takes both
    # looks (at the first, the matrix's spread prior for WikiText, 0.031, puts 1.02 under 2 standard errors away)
    settled = workbench.settle(_with_gate(case, ppl_ratio_max=10.0))
    assert settled.verdict.status == "pass" and "look 1 of 2 (n=16 of 32)" in settled.verdict.reason
    assert settled.baseline.n == settled.quantized.n == 16 and spans == [range(0, 16)] * 2  # baseline, candidate
    assert workbench.results.cached(case.model, "wikitext", case.quant_name, n=16)
    assert not workbench.results.cached(case.model, "wikitext", case.quant_name)
    settled = workbench.settle(_with_gate(case, ppl_ratio_max=1.02))
    assert settled.verdict.status == "pass" and "look 2 of 2 (n=32 of 32)" in settled.verdict.reason
    assert spans[2:] == [range(16, 32)] * 2  # the first span came from the cache
    whole = workbench.evaluate(case.model, "wikitext", case.quant_name)
    assert len(spans) == 4 and [r["id"] for r in whole.items] == [f"window-{i}" for i in range(32)]
    # the same windows in the same batches as one evaluation of all 32: the same records, bit for bit
    model = workbench.quantized(case.model, case.quant_name, case.quant).model
    baseline, tokenizer = workbench.baseline(case.model)
    with dequantized_weights(model):
        at_once = stores.evaluate(model, tokenizer, workbench.task(case.model, "wikitext"),
                                  workbench.items(case.model, "wikitext"), range(32), reference_model=baseline)
    assert at_once.items == whole.items and at_once.metrics == whole.metrics


def test_a_case_that_is_not_sequential_reads_every_item(two_looks):
    workbench, case = two_looks
    settled = workbench.settle(_with_gate(case, ppl_ratio_max=10.0, sequential=False))
    assert settled.baseline.n == 32 and settled.verdict.status == "pass" and "look" not in settled.verdict.reason
    assert workbench.looks(_with_gate(case, sequential=False)) == [32] and workbench.looks(case) == [16, 32]
