"""Report rows built by hand, for the report's and the decisions' tests."""

KERNEL = "int4 tinygemm-style aten._weight_int4pack_mm_for_cpu (bf16 activations, groups of 128; rest bf16)"


def row(quant, task, metric, verdict, reason="", bytes_quantized=110e6, p=None):
    return {"model": "smollm2-135m", "method": quant.split("-")[0], "config": quant, "quant": quant, "task": task,
            "metric": metric, "baseline": 0.5, "quantized": 0.45, "retention": 0.9, "retention_ci_low": 0.8,
            "retention_ci_high": 1.0, "n": 32, "model_bytes_baseline": 538e6, "model_bytes_quantized": bytes_quantized,
            "memory_reduction": 538e6 / bytes_quantized, "verdict": verdict, "verdict_reason": reason,
            "flips_correct_to_wrong": 3, "flips_wrong_to_correct": 1, "mcnemar_p": 0.6, "chance": 0.5, "bm25": None,
            "mean_kld": None, "mean_kld_se": None, "same_top_p": None, "ttft_ms": 800.0, "decode_tokens_per_s": 40.0,
            "kernel": KERNEL, "quantize_seconds": 12.5, "calibration": None, "fallback_layers": 180,
            "quantized_layers": 210, "skipped_reason": None,
            "headline_metric": metric != "flexible-extract", "p_at_least_threshold": p}


def decision_report():
    """Three configs of one model: w8 large and faithful, w4g32 smaller, w4g128 smallest and worst; BoolQ
    uninformative throughout."""
    rows = []
    for quant, size, ppl, interval, kld in (("rtn-w8", 160e6, 0.99, (0.98, 1.0), 0.004),
                                            ("rtn-w4g32", 120e6, 0.93, (0.91, 0.95), 0.3),
                                            ("rtn-w4g128", 100e6, 0.90, (0.87, 0.93), 0.5)):
        wikitext = row(quant, "wikitext", "perplexity", "pass", bytes_quantized=size)
        wikitext.update(retention=ppl, retention_ci_low=interval[0], retention_ci_high=interval[1], mean_kld=kld)
        msmarco = row(quant, "msmarco", "ndcg@10", "pass", bytes_quantized=size)
        msmarco.update(retention=ppl + 0.02, retention_ci_low=interval[0] - 0.05, retention_ci_high=1.02)
        rows += [row(quant, "boolq", "accuracy", "uninformative", bytes_quantized=size), wikitext, msmarco]
    performance = [{"model": "smollm2-135m", "quant": q, "decode_speedup": s}
                   for q, s in (("rtn-w8", 1.2), ("rtn-w4g32", 1.9), ("rtn-w4g128", 2.1))]
    return {"rows": rows, "performance": performance}
