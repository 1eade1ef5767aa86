"""The report's first screen (the headline) and its detailed tables, on a report built by hand."""
import json

from quant import report

KERNEL = "int4 tinygemm-style aten._weight_int4pack_mm_for_cpu (bf16 activations, groups of 128; rest bf16)"


def _row(quant, task, metric, verdict, reason="", bytes_quantized=110e6):
    return {"model": "smollm2-135m", "method": quant.split("-")[0], "config": quant, "quant": quant, "task": task,
            "metric": metric, "baseline": 0.5, "quantized": 0.45, "retention": 0.9, "retention_ci_low": 0.8,
            "retention_ci_high": 1.0, "n": 32, "model_bytes_baseline": 538e6, "model_bytes_quantized": bytes_quantized,
            "memory_reduction": 538e6 / bytes_quantized, "verdict": verdict, "verdict_reason": reason,
            "flips_correct_to_wrong": 3, "flips_wrong_to_correct": 1, "mcnemar_p": 0.6, "chance": 0.5, "bm25": None,
            "mean_kld": None, "mean_kld_se": None, "same_top_p": None, "ttft_ms": 800.0, "decode_tokens_per_s": 40.0,
            "kernel": KERNEL, "quantize_seconds": 12.5, "calibration": None, "fallback_layers": 180,
            "quantized_layers": 210, "skipped_reason": None}


def _report():
    rows = [
        _row("rtn-w4g128", "boolq", "accuracy", "uninformative", "baseline 0.5 is not informative"),
        _row("rtn-w4g128", "gsm8k", "strict-match", "pass"),
        _row("rtn-w4g128", "gsm8k", "flexible-extract", "fail", "retention 95% CI [0.2, 0.5] lies below 0.9"),
        _row("rtn-w4g128", "wikitext", "perplexity", "pass"),
        _row("gptq-w4g128", "boolq", "accuracy", "pass", bytes_quantized=100e6),
        _row("gptq-w4g128", "gsm8k", "strict-match", "uninformative", bytes_quantized=100e6),
        _row("gptq-w4g128", "wikitext", "perplexity", "inconclusive", "inconclusive at n=6: about n=40 would settle it",
             bytes_quantized=100e6),
    ]
    skipped = [{"model": model, "method": "rtn", "config": quant, "quant": quant, "task": task, "metric": "accuracy",
                "skipped_reason": "tier gpu: not run in this cpu report"}
               for model in ("llama-3.2-1b", "qwen2.5-0.5b", "phi-1.5") for quant in ("rtn-w4g128", "gptq-w4g128")
               for task in ("boolq", "gsm8k", "msmarco")]
    timed = {"dtype": "float32", "ttft_ms": 800.0, "decode_ms_per_token": 25.0, "output_tokens_per_s": 30.0,
             "batch_decode_tokens_per_s": 100.0, "batch": 8, "model_bytes": 538e6, "peak_memory_bytes": 2e9}
    performance = [{**timed, "model": "smollm2-135m", "quant": "baseline", "decode_tokens_per_s": 20.0,
                    "kernel": "dense fp32"},
                   {**timed, "model": "smollm2-135m", "quant": "rtn-w4g128", "decode_tokens_per_s": 40.0,
                    "kernel": KERNEL, "decode_speedup": 2.0},
                   {"model": "smollm2-135m", "quant": "gptq-w4g128", "skipped_reason": "no kernel"}]
    return {"machine": {"cpu": "test"}, "command": "quant report", "profile": "report", "rows": rows + skipped,
            "performance": performance}


def test_the_headline_gives_each_config_its_verdict_per_task_then_the_reasons_and_counts():
    lines = report.headline(_report())
    assert lines[0] == "**smollm2-135m** (baseline 538 MB, decode 20.0 tok/s)"
    assert "| config | boolq | gsm8k | wikitext | MB (×) | decode speed-up |" in lines
    # a task's verdict is its worst metric's: gsm8k fails on flexible-extract although strict-match passed
    assert "| rtn-w4g128 | uninformative | fail | pass | 110 (4.9×) | 2.00× |" in lines
    assert "| gptq-w4g128 | pass | uninformative | inconclusive | 100 (5.4×) | – |" in lines
    assert "Rows: 7 measured: 1 fail, 1 inconclusive, 3 pass, 2 uninformative." in lines
    assert ("- smollm2-135m rtn-w4g128 gsm8k (flexible-extract): fail: retention 95% CI [0.2, 0.5] lies below 0.9"
            in lines)
    assert any(line.startswith("- smollm2-135m gptq-w4g128 wikitext (perplexity): inconclusive") for line in lines)
    # 18 skipped cases are one line, not 18 rows
    assert lines[-1] == ("Skipped, tier gpu: not run in this cpu report: 18 cases (18 rows) of llama-3.2-1b, "
                         "qwen2.5-0.5b, phi-1.5.")
    assert len(lines) <= 40


def test_the_detailed_table_keeps_measured_rows_and_names_kernels_by_a_key(tmp_path):
    built = _report()
    table = report.markdown(built).splitlines()
    assert len(table) == 2 + 7  # header, rule, the measured rows; the skipped ones are in the headline
    assert all(KERNEL not in line for line in table) and "[K1]" in table[2]
    json_path, md_path = report.write(built, tmp_path)
    text = md_path.read_text()
    assert text.index("**smollm2-135m**") < text.index("## Results") < text.index("## Performance")
    assert f"K1 = {KERNEL}" in text and text.count(KERNEL) == 1
    assert json.loads(json_path.read_text())["rows"] == built["rows"]  # the JSON keeps every row, skipped ones too
