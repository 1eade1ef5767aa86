"""The report's first screen (the headline) and its detailed tables, on a report built by hand."""
import copy
import dataclasses
import json
from collections import namedtuple
from types import SimpleNamespace

import pytest

from quant import report
from quant.perf import PerfSettings
from tests.helpers.report_rows import KERNEL, row as _row
from tests.helpers.compilers import missing_compiler


def _report():
    rows = [
        _row("rtn-w4g128", "boolq", "accuracy", "uninformative", "baseline 0.5 is not informative"),
        _row("rtn-w4g128", "gsm8k", "strict-match", "pass", p=0.6),
        _row("rtn-w4g128", "gsm8k", "flexible-extract", "fail", "retention 95% CI [0.2, 0.5] lies below 0.9", p=0.001),
        _row("rtn-w4g128", "wikitext", "perplexity", "pass", p=0.7),
        _row("gptq-w4g128", "boolq", "accuracy", "pass", bytes_quantized=100e6, p=0.5),
        _row("gptq-w4g128", "gsm8k", "strict-match", "uninformative", bytes_quantized=100e6),
        _row("gptq-w4g128", "wikitext", "perplexity", "inconclusive", "inconclusive at n=6: about n=40 would settle it",
             bytes_quantized=100e6, p=0.1),
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
    assert lines[-2] == ("Skipped, tier gpu: not run in this cpu report: 18 cases (18 rows) of llama-3.2-1b, "
                         "qwen2.5-0.5b, phi-1.5.")
    # last, the whole run's verdict over each case's headline gate (as the merge gate runs them)
    assert lines[-1] == "this change: pass, 0 of 4 informative gates fail after Holm's correction."
    assert len(lines) <= 40
    assert "Items: boolq 32, gsm8k 32, wikitext 32." in lines
    assert not any(line.startswith("Uninformative") for line in lines)  # each task gates at least one config


def _performance_cells(built: dict) -> tuple[list[str], list[list[str]]]:
    """The performance table's header and its rows, each as its cells (the markdown rule between them left out)."""
    header, _, *lines = [[cell.strip(" |") for cell in line.split(" | ")]
                         for line in report.performance_table(built).splitlines()]
    return header, lines


def test_the_performance_table_gives_the_compiled_decode_its_speed_up_over_the_eager_baseline():
    built = _report()
    built["performance"][1].update(compiled_decode_ms_per_token=8.0, compiled_bandwidth_share=0.6,
                                   compiled_decode_speedup=3.1, compiled_decode_speedup_low=2.9,
                                   compiled_decode_speedup_high=3.3)
    header, lines = _performance_cells(built)
    column = header.index("compiled decode speed-up vs baseline eager")
    cells = {line[1]: line for line in lines}
    assert cells["rtn-w4g128"][column] == "3.10× [2.90, 3.30]"
    assert cells["rtn-w4g128"][column - 1] == "8.00 (60%)"
    assert cells["baseline"][column] == "–"  # not compiled in this run


def _timed_rows(model, calibration_ids, **settings) -> list[dict]:
    """The report's timing rows of a tiny model's baseline and a copy of it named rtn-w4g32, with short settings."""
    models = {None: model, "rtn-w4g32": copy.deepcopy(model)}
    workbench = SimpleNamespace(runnable=lambda spec, quant, dtype: (models[quant], "dense fp32"),
                                wikitext_ids=lambda spec: calibration_ids[0], device_for=lambda spec: "cpu")
    short = PerfSettings(prompt_tokens=16, new_tokens=4, batch=2, batch_prompt_tokens=8, batch_new_tokens=2,
                         warmup=0, repeats=1, **settings)
    spec = namedtuple("Spec", "name")("tiny")  # hashable, as a ModelSpec is
    return report.performance_rows(workbench, [(spec, None, None), (spec, "rtn-w4g32", None)], 20e9, short)


def test_a_variant_that_does_not_compile_is_timed_eager_and_its_compiled_cells_say_why(tiny_llama, calibration_ids):
    no_compiler = missing_compiler()
    rows = _timed_rows(tiny_llama, calibration_ids, rounds=2, compiled=no_compiler)
    assert [row["quant"] for row in rows] == ["baseline", "rtn-w4g32"]
    assert all(len(row["decode_ms_per_token_rounds"]) == 2 and "compiled_decode_ms_per_token" not in row for row in rows)
    header, lines = _performance_cells({"rows": [], "performance": rows})
    column = header.index("compiled decode ms/token (share)")
    assert {line[column] for line in lines} == {"not compiled: RuntimeError: no working C++ compiler found"}
    assert "compiled TTFT ms" not in header  # no prompt was compiled: no columns of dashes


def test_a_compiled_prompt_is_timed_against_the_faster_baseline_dtype_of_each_round(tiny_llama, calibration_ids):
    seconds = {"baseline": [1.0, 2.0, 1.0], "baseline-bfloat16": [0.5, 3.0, 0.4], "rtn-w4g32": [0.1, 0.1, 0.1]}
    assert report._fastest_baseline(seconds, {"baseline", "baseline-bfloat16"}) == [0.5, 2.0, 0.4]
    rows = _timed_rows(tiny_llama, calibration_ids, rounds=3, compiled="eager", compiled_prefill=True)
    for row in rows:
        assert len(row["compiled_ttft_ms_rounds"]) == 3
        assert row["compiled_ttft_speedup_low"] <= row["compiled_ttft_speedup_high"]
        fastest = row["ttft_ms_rounds"] if row["quant"] == "baseline" else rows[0]["ttft_ms_rounds"]
        ratios = sorted(f / c for f, c in zip(fastest, row["compiled_ttft_ms_rounds"]))
        assert row["compiled_ttft_speedup_low"] == pytest.approx(ratios[0])
    header, lines = _performance_cells({"rows": [], "performance": rows})
    column = header.index("compiled TTFT speed-up vs the faster baseline eager")
    assert all(line[column] not in ("", "–") for line in lines)


def test_the_size_of_a_compiled_prompts_package_is_reported_beside_its_ttft(tiny_llama, calibration_ids, monkeypatch):
    """An inductor package carries its own copy of the weights: the report shows its size, so a compiled TTFT is
    never read without it (an exported prompt, here, has no package)."""
    timed = report.interleaved_latency
    monkeypatch.setattr(report, "interleaved_latency", lambda *args: dataclasses.replace(
        timed(*args), package_bytes={"rtn-w4g32": 431_000_000}))
    rows = _timed_rows(tiny_llama, calibration_ids, rounds=2, compiled="eager", compiled_prefill=True)
    header, lines = _performance_cells({"rows": [], "performance": rows})
    column = header.index("compiled prompt package MB (its own weights)")
    assert [line[column] for line in lines] == ["–", "431"]


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


def test_a_sequential_stop_shows_its_items_and_what_it_saved():
    data = _report()
    stopped = data["rows"][3]  # rtn-w4g128 wikitext, the headline of its case
    stopped.update(n=16, n_planned=40)
    data["rows"][6].update(n=40, n_planned=40)
    assert report.items_cell(stopped) == "16 of 40" and report.items_cell(data["rows"][6]) == "40"
    assert "| 16 of 40 |" in report.markdown(data)
    lines = report.headline(data)
    assert "Sequential gates: 1 of 2 cases decided before the profile's n; 56 of 80 items read per model (30% fewer)." in lines
    assert not any(line.startswith("Sequential") for line in report.headline(_report()))  # nothing stopped early


class _Workbench:
    """Decides case "a" at its first look, "b" at its second and last; "c" cannot run."""

    def looks(self, case):
        return [16, 32]

    def settle_look(self, case, look):
        if case.id == "c":
            raise OSError("weights not found")
        return f"{case.id} at {look}" if look == {"a": 0, "b": 1}[case.id] else None


def test_cases_are_settled_look_by_look_and_a_broken_one_keeps_its_error():
    cases = [SimpleNamespace(id=name, task=SimpleNamespace(kind="choice")) for name in "abc"]
    settled = report.settle_cases(_Workbench(), cases)
    assert settled["a"] == ("a at 0", 16) and settled["b"] == ("b at 1", 32)
    assert isinstance(settled["c"], OSError)
