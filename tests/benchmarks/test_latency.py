"""Latency benchmarks generated from matrix.yaml: model x variant (baseline dtypes, each quantization config the
model's cases use) x phase (prefill of the timing prompt = time to first token; decode at batch 1 on its KV
cache). Each saved run carries the kernel, memory and the variant's accuracy and retention in extra_info, so one
JSON holds speed and quality together (``quant history`` plots them across runs).

Not part of the default run (``make test`` passes --benchmark-skip); ``make bench`` runs and saves them.
"""
from __future__ import annotations

import pytest
import torch

from quant.matrix import load_matrix
from quant.perf import decode, dtype_name, prefill, variant_label
from quant.gate import headline_metric
from quant.qlinear import model_bytes

BASELINE_DTYPES = {"cpu": [None, torch.bfloat16], "gpu": [None]}  # None: the model's own dtype
PHASES = ["prefill", "decode"]


def _variants():
    matrix = load_matrix()
    for spec in matrix.models.values():
        cases = [c for c in matrix.cases if c.model is spec]
        marks = [pytest.mark.gpu] if spec.tier == "gpu" else []
        for dtype in BASELINE_DTYPES[spec.tier]:
            yield spec.name, None, dtype, variant_label(None, dtype), marks
        for quant_name in dict.fromkeys(c.quant_name for c in cases):
            slow = all(c.cadence == "slow" for c in cases if c.quant_name == quant_name)
            yield spec.name, quant_name, None, quant_name, marks + ([pytest.mark.slow] if slow else [])


def pytest_generate_tests(metafunc):
    params = [pytest.param(model, quant, dtype, f"{model}-{name}", phase, id=f"{model}-{name}-{phase}", marks=marks)
              for model, quant, dtype, name, marks in _variants() for phase in PHASES]
    metafunc.parametrize("model_name,quant_name,dtype,variant,phase", params)


def _quality(workbench, spec, quant_name):
    """The variant's headline scores on the model's default-cadence cases (cached by the matrix tests) and, for
    a quantized variant, its retention; flat keys for extra_info."""
    quality = {}
    for case in workbench.settings.matrix.cases:
        if case.model is not spec or case.cadence != "default":
            continue
        metric = headline_metric(case)
        if quant_name is None:
            quality[f"score.{case.task.name}.{metric}"] = workbench.evaluate(spec, case.task.name).metrics[metric]
        elif case.quant_name == quant_name:
            comparison = workbench.compare(case)
            quality[f"score.{case.task.name}.{metric}"] = comparison.quantized.metrics[metric]
            if comparison.retention is not None:
                quality[f"retention.{case.task.name}.{metric}"] = comparison.retention
    return quality


def test_latency(benchmark, workbench, model_name, quant_name, dtype, variant, phase):
    spec = workbench.settings.matrix.models[model_name]
    model, kernel = workbench.runnable(spec, quant_name, dtype)
    settings = workbench.perf_settings(spec)
    ids = workbench.wikitext_ids(spec)[None, : settings.prompt_tokens].to(workbench.device_for(spec))
    sync = torch.cuda.synchronize if workbench.device_for(spec).startswith("cuda") else (lambda: None)

    def run_prefill():
        prefill(model, ids)
        sync()

    def run_decode(cache, token):
        decode(model, cache, token, settings.new_tokens)
        sync()

    if phase == "prefill":
        benchmark.pedantic(run_prefill, rounds=settings.repeats, warmup_rounds=settings.warmup)
        tokens = settings.prompt_tokens
    else:  # the prefill that builds the KV cache is setup, not timed
        benchmark.pedantic(run_decode, setup=lambda: (prefill(model, ids), {}), rounds=settings.repeats,
                           warmup_rounds=settings.warmup)
        tokens = settings.new_tokens
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "variant": variant,
        "kernel": kernel, "dtype": dtype_name(next(model.parameters()).dtype),
        "device": workbench.device_for(spec), "threads": torch.get_num_threads(), "tokens": tokens,
        "tokens_per_s": tokens / median, "model_bytes": model_bytes(model),
        # scores were measured in the model's own dtype: a recast baseline has none of its own
        **(_quality(workbench, spec, quant_name) if dtype is None else {}),
    })
