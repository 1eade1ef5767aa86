"""The report's first screen (the headline) and its detailed tables, on a report built by hand."""
import json

import pytest

from quant import decide, report
from quant.config import ConfigError

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
             "batch_decode_tokens_per_s": 100.0, "batch": 8, "model_bytes": 538e6, "peak_memory_bytes": 2e9,
             "bytes_per_token": 560e6, "achieved_gb_per_s": 22.4, "bandwidth_share": 0.5, "roofline_ms_per_token": 12.5}
    performance = [{**timed, "model": "smollm2-135m", "quant": "baseline", "decode_tokens_per_s": 20.0,
                    "kernel": "dense fp32"},
                   {**timed, "model": "smollm2-135m", "quant": "rtn-w4g128", "decode_tokens_per_s": 40.0,
                    "kernel": KERNEL, "decode_speedup": 2.0, "decode_speedup_low": 1.9, "decode_speedup_high": 2.1},
                   {**timed, "model": "smollm2-135m", "quant": "rtn-w8", "decode_tokens_per_s": 22.0, "kernel": KERNEL,
                    "decode_speedup": None, "decode_speedup_low": 0.6, "decode_speedup_high": 1.9,
                    "decode_speedup_unmeasurable": "not measurable on this run: machine busy (spread 43%)"},
                   {"model": "smollm2-135m", "quant": "gptq-w4g128", "skipped_reason": "no kernel"}]
    return {"machine": {"cpu": "test"}, "command": "quant report", "profile": "report", "rows": rows + skipped,
            "performance": performance}


def test_the_headline_gives_each_config_its_verdict_per_task_then_the_reasons_and_counts():
    lines = report.headline(_report())
    assert lines[0] == "**smollm2-135m** (baseline 538 MB, decode 20.0 tok/s)"
    assert "| config | boolq | gsm8k | wikitext | MB (×) | decode speed-up |" in lines
    # a task's verdict is its worst metric's: gsm8k fails on flexible-extract although strict-match passed
    assert "| rtn-w4g128 | uninformative | fail | pass | 110 (4.9×) | 2.00× [1.90, 2.10] |" in lines
    assert "| gptq-w4g128 | pass | uninformative | inconclusive | 100 (5.4×) | – |" in lines
    assert "Rows: 7 measured: 1 fail, 1 inconclusive, 3 pass, 2 uninformative." in lines
    assert ("- smollm2-135m rtn-w4g128 gsm8k (flexible-extract): fail: retention 95% CI [0.2, 0.5] lies below 0.9"
            in lines)
    assert any(line.startswith("- smollm2-135m gptq-w4g128 wikitext (perplexity): inconclusive") for line in lines)
    # 18 skipped cases are one line, not 18 rows
    assert lines[-1] == ("Skipped, tier gpu: not run in this cpu report: 18 cases (18 rows) of llama-3.2-1b, "
                         "qwen2.5-0.5b, phi-1.5.")
    assert len(lines) <= 40
    assert "Items: boolq 32, gsm8k 32, wikitext 32." in lines
    assert not any(line.startswith("Uninformative") for line in lines)  # each task gates at least one config


def test_the_headline_names_the_tasks_uninformative_for_a_model_in_every_config():
    built = _report()
    for row in built["rows"]:
        if row["task"] == "gsm8k":
            row["verdict"], row["n"] = "uninformative", 8
    lines = report.headline(built)
    assert "Items: boolq 32, gsm8k 8, wikitext 32." in lines
    assert [line for line in lines if line.startswith("Uninformative")] == [
        "Uninformative for smollm2-135m in every config: gsm8k (the baseline is at chance or solves too few items "
        "to gate retention on); the profile keeps their item counts small."]


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
    assert "| 560 | 22.4 (50%) | 12.50 |" in text  # the roofline columns of the performance table
    assert "![retention per task and config](retention.png)" in text  # no KLD figure: no row has a KLD
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "kld.png").exists()


def test_the_kld_figure_is_drawn_when_rows_have_a_kld(tmp_path):
    built = _decision_report()
    for row in built["rows"]:
        row["mean_kld_se"] = None if row["mean_kld"] is None else 0.01
    assert report.kld_chart(built, tmp_path / "kld.png").read_bytes()[:4] == b"\x89PNG"
    assert report.retention_chart(built, tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"


def _decision_report():
    """Three configs of one model: w8 large and faithful, w4g32 smaller, w4g128 smallest and worst; BoolQ
    uninformative throughout."""
    rows = []
    for quant, size, ppl, interval, kld in (("rtn-w8", 160e6, 0.99, (0.98, 1.0), 0.004),
                                            ("rtn-w4g32", 120e6, 0.93, (0.91, 0.95), 0.3),
                                            ("rtn-w4g128", 100e6, 0.90, (0.87, 0.93), 0.5)):
        wikitext = _row(quant, "wikitext", "perplexity", "pass", bytes_quantized=size)
        wikitext.update(retention=ppl, retention_ci_low=interval[0], retention_ci_high=interval[1], mean_kld=kld)
        msmarco = _row(quant, "msmarco", "ndcg@10", "pass", bytes_quantized=size)
        msmarco.update(retention=ppl + 0.02, retention_ci_low=interval[0] - 0.05, retention_ci_high=1.02)
        rows += [_row(quant, "boolq", "accuracy", "uninformative", bytes_quantized=size), wikitext, msmarco]
    performance = [{"model": "smollm2-135m", "quant": q, "decode_speedup": s}
                   for q, s in (("rtn-w8", 1.2), ("rtn-w4g32", 1.9), ("rtn-w4g128", 2.1))]
    return {"rows": rows, "performance": performance}


def test_points_take_each_tasks_headline_metric_and_leave_uninformative_tasks_out():
    candidates, baseline = decide.points(_decision_report(), "smollm2-135m")
    by_quant = {p.quant: p for p in candidates}
    assert sorted(by_quant["rtn-w4g32"].retention) == ["msmarco", "wikitext"]  # boolq is uninformative
    assert by_quant["rtn-w4g32"].retention["wikitext"] == (0.93, 0.91, 0.95)
    assert by_quant["rtn-w4g32"].score(decide.AVERAGE) == pytest.approx((0.94, 0.885, 0.985))
    assert by_quant["rtn-w4g128"].mean_kld == 0.5 and by_quant["rtn-w4g128"].decode_speedup == 2.1
    assert baseline.bytes == 538e6 and baseline.retention["wikitext"] == (1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="no measured rows for model 'phi-1.5'"):
        decide.points(_decision_report(), "phi-1.5")


def test_the_frontier_keeps_only_configs_no_other_beats_on_both_axes():
    candidates, _ = decide.points(_decision_report(), "smollm2-135m")
    assert [p.quant for p in decide.frontier(candidates, "wikitext")] == ["rtn-w4g128", "rtn-w4g32", "rtn-w8"]
    dominated = decide.Point("smollm2-135m", "gptq-bad", 130e6, 1.5, {"wikitext": (0.92, 0.9, 0.94)}, 0.4)
    assert "gptq-bad" not in [p.quant for p in decide.frontier(candidates + [dominated], "wikitext")]
    assert [p.quant for p in decide.frontier(candidates + [dominated], "kld")] == ["rtn-w4g128", "rtn-w4g32", "rtn-w8"]


def test_recommend_judges_retention_on_the_interval_and_names_what_nothing_meets():
    candidates, _ = decide.points(_decision_report(), "smollm2-135m")
    # w4g32's point estimate 0.93 would pass 0.92, its lower bound 0.91 does not: the gate's rule
    apart = decide.recommend(candidates, "wikitext", max_bytes=decide.parse_size("130MB"), min_retention=0.92)
    assert apart.chosen is None and apart.unmet == []  # w8 holds the retention, the w4s the memory
    assert apart.lines("wikitext")[0].endswith("each is met by some config, never all at once")
    assert apart.closest.quant == "rtn-w4g32"  # each misses one constraint; w4g32 by the least (0.91 for 0.92)
    assert decide.recommend(candidates, "wikitext", max_bytes=130e6, min_retention=0.9).chosen.quant == "rtn-w4g32"
    fast = decide.recommend(candidates, "wikitext", min_retention=0.85, min_decode_speedup=2)
    assert fast.lines("wikitext")[0].startswith(
        "ship rtn-w4g128: 100 MB, retention on wikitext 0.900 [95% CI 0.870, 0.930], decode 2.10x the baseline")
    unreachable = decide.recommend(candidates, "wikitext", min_retention=0.99)
    assert unreachable.unmet == ["retention lower bound on wikitext >= 0.99"]
    assert unreachable.closest.quant == "rtn-w8"  # 0.98 of 0.99
    with pytest.raises(ConfigError, match="150 parsecs"):
        decide.parse_size("150 parsecs")
    assert decide.parse_size("1.5GB") == 1.5e9 and decide.parse_size("200MiB") == 200 * 2**20


def test_pareto_and_recommend_commands(tmp_path, capsys):
    from quant.cli import main

    path = tmp_path / "latest.json"
    path.write_text(json.dumps(_decision_report()))
    assert main(["pareto", "--report", str(path), "--task", "wikitext"]) == 0
    png = tmp_path / "pareto-smollm2-135m-wikitext.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "rtn-w4g128: 100 MB, retention 0.900" in capsys.readouterr().out
    assert main(["recommend", "--report", str(path), "--task", "wikitext", "--max-memory", "150MB",
                 "--min-retention", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("ship rtn-w4g32")
    assert main(["recommend", "--report", str(path), "--task", "wikitext", "--max-memory", "110MB",
                 "--min-retention", "0.95"]) == 1
    assert "closest: rtn-w4g128" in capsys.readouterr().out  # 0.87 for 0.95; w8 is 45% too large


def test_spearman_with_its_exact_permutation_p_value():
    assert decide.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == (pytest.approx(1.0), pytest.approx(2 / 24))
    assert decide.spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    rho, p = decide.spearman([1, 2, 2, 3], [1, 3, 2, 4])  # ties share their mean rank
    assert rho == pytest.approx(0.9486832980505138) and 0 < p < 1
    rho, p = decide.spearman(list(range(12)), list(range(12)))  # sampled permutations beyond 8 items
    assert rho == pytest.approx(1.0) and p < 0.001


def test_correlations_skip_uninformative_tasks_and_state_n_and_p(tmp_path, capsys):
    table = decide.correlations(_decision_report(), "smollm2-135m")
    assert table[0] == {"task": "boolq", "note": "uninformative for this model: not correlated"}
    # msmarco retention falls as the perplexity ratio and the KLD rise: rho -1 over 3 configs, p = 2 / 3!
    assert table[1] == {"task": "msmarco", "predictor": "perplexity ratio", "n": 3, "rho": pytest.approx(-1.0),
                        "p": pytest.approx(1 / 3)}
    assert table[2]["predictor"] == "mean KLD" and table[2]["rho"] == pytest.approx(-1.0)
    from quant.cli import main

    path = tmp_path / "latest.json"
    path.write_text(json.dumps(_decision_report()))
    assert main(["correlate", "--report", str(path)]) == 0
    assert "msmarco vs perplexity ratio: rho -1.000, n 3, p 0.333" in capsys.readouterr().out
