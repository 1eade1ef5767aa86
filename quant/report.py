"""The report: one flat row per model x method x task x metric, written as JSON and Markdown."""
from __future__ import annotations

import contextlib
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from quant.figures import kld_chart, retention_chart
from quant.matrix import Case
from quant.models import ModelSpec
from quant.gate import Comparison, joint_verdict, task_metrics
from quant.kinds import kind_of
from quant.kinds.perplexity import DIVERGENCE_METRICS
from quant.pipeline import Workbench
from quant.perf import (PerfSettings, decode_figures, dtype_name, interleaved_latency, latency_figures, machine_facts,
                        measure, memory_bandwidth, model_bytes, paired_speedup, roofline, unmeasurable_reason,
                        variant_label)

log = logging.getLogger("quant")

NOTES = [
    "smollm2-135m's baseline is itself a dequantized 4-bit model (GGUF Q4_1: groups of 32 along the input, "
    "float minimum). The integer zero-point grids here do not reproduce that grid, so re-quantizing it is not "
    "lossless even at 8 bits, and its losses are larger than quantizing an fp16 model would cost.",
    "Group sizes that do not divide a layer's input width fall back per layer to the largest halving that does "
    "(576 at g128 -> g64; 6 of 7 linears per smollm2 block); `fallback_layers` counts them.",
    "GPTQ and GSQ calibrate on windows drawn from the second half of the WikiText-2 test text; perplexity is "
    "measured on the first windows of the same raw file (wiki.test.raw as is, the llama.cpp convention), which "
    "never reach the calibration half.",
    "MS MARCO here is the TREC DL 2019/2020 passage-ranking set (BM25 top-100, graded labels), re-ranked over "
    "the BM25 top-k by query likelihood; it is not the QnA v1.1 split of the reference study. nDCG@10 and MRR@10 "
    "are trec_eval's (ndcg_cut: the grade as gain, the ideal ranking over every judged passage in the qrels; "
    "MRR relevance at grade >= 2). The 'chance / BM25' column holds BM25's own figure on the same queries; a "
    "baseline that does not beat it is 'uninformative'.",
    "Retention is quantized / baseline (baseline / quantized for perplexity) with a 95% paired-bootstrap "
    "interval over items (2,000 resamples, seed 0). Rows whose baseline does not beat chance (or BM25) are "
    "'uninformative' and are gated instead on the correlation of the per-item yes-no score with the baseline's "
    "(BoolQ), of the per-query score (MS MARCO), or on keeping the answer format (GSM8K).",
    "The detectable drop is the smallest retention drop below 1 that the row's gate fails with 80% probability at "
    "its n (from the bootstrap's standard error): a gate cannot see a drop smaller than it. The last headline "
    "line combines every case's headline gate with Holm's correction (family-wise false-fail rate 2.5%).",
    "Mean KLD (± its standard error) and same-top-token rate compare each quantized model's next-token "
    "distribution with the baseline's on the WikiText windows, KL(baseline || quantized) over the whole "
    "vocabulary with the baseline run beside the model, as llama.cpp's --kl-divergence computes it; the JSON "
    "rows also hold the median and 99th percentile KLD and ln(PPL ratio).",
    "Contexts, prompts and perplexity windows start with the tokenizer's own prefix: a BOS for Llama-3, none for "
    "SmolLM2 or Qwen2 (the tokenizer's rule; lm-evaluation-harness would prefix perplexity windows with any BOS "
    "the tokenizer has).",
    "Accuracy is computed with weights dequantized once per evaluation (bit-identical to the per-call "
    "reference); memory is measured on the packed model.",
]


PERF_NOTE = (
    "Batch 1 unless stated: time to first token = prefill of the first WikiText-2 tokens (perf settings in "
    "matrix.yaml, recorded per row in latest.json); decode = greedy steps on the KV cache; output tok/s = "
    "generated tokens over prefill + decode (the reference study's throughput). Time to first token and decode are "
    "timed interleaved: each round times every variant of a model once, in a rotating order, after a memory-copy probe "
    "of the machine; figures are medians over the rounds. A decode speed-up is the median per-round ratio to the "
    "baseline [lowest, highest round]; it reads 'not measurable on this run' when the machine was busy (other "
    "processes took over 20% of the CPUs in a round, or the memory probe moved by over 35%), or when the rounds' "
    "range of ratios reaches 1. Compiled decode (profiles that set perf.compiled): the same greedy steps on a static "
    "KV cache through a torch.compile'd step, what a deployment would serve, timed in the same rounds; its speed-up "
    "is against the eager baseline's decode of the same round. Compiled TTFT (profiles that also set "
    "perf.compiled_prefill): the prompt's forward exported and compiled ahead of time by inductor on frozen weights "
    "with its autotuned GEMM templates, cached in the result cache (compiled once per model, prompt length and "
    "CPU); its speed-up is against the faster of the baseline's dtypes, eager, in the same round, and the size of "
    "its package is beside it (the package carries its own copy of the weights, repacked for its GEMMs, and holds "
    "at least that much memory once loaded). Roofline: a "
    "decode step at batch 1 reads every weight and the KV cache once (MB read / token); achieved GB/s is that over "
    "decode ms/token, its share is of this machine's memory bandwidth (machine line: a copy of a 256 MiB buffer, "
    "best of 5, read + written bytes), and roofline ms/token is the fastest the bytes allow. Model MB "
    "counts the tensors as they run (the fast kernels' tiled codes and bf16 scale/offset pairs, the rest of the "
    "model in bf16); peak memory is the process's peak RSS during the timing (every model the run holds), or "
    "torch.cuda.max_memory_allocated on a GPU."
)


def describe(comparison: Comparison) -> str:
    """The failure message of a regression case: both scores, retention and its interval, the item count."""
    c = comparison
    interval = f" [95% CI {c.interval[0]:.3f}, {c.interval[1]:.3f}]" if c.interval else ""
    retention = "undefined" if c.retention is None else f"{c.retention:.3f}"
    lines = [
        f"{c.case.id}: {c.verdict.status}: {c.verdict.reason}",
        f"  {c.metric}: baseline {c.baseline.metrics[c.metric]:.4f}, quantized {c.quantized.metrics[c.metric]:.4f}, "
        f"retention {retention}{interval}, n={c.baseline.n}",
    ]
    lines += [f"  {key}: {value}" for key, value in c.extra.items()]
    return "\n".join(lines)


def settle_cases(workbench: Workbench, cases: list[Case]) -> dict[str, tuple[Comparison, int] | Exception]:
    """Each case's headline gate and the items it read, look by look (``Workbench.settle_look``): at each look the
    variants of a task that runs the baseline beside them are evaluated together on the look's span, then every case
    still open is judged; a case stops at the look that decides it. A case that cannot run keeps its error."""
    settled: dict[str, tuple[Comparison, int] | Exception] = {}
    pending, look = list(cases), 0
    while pending:
        log.info("look %d: %d of %d cases open", look + 1, len(pending), len(cases))
        evaluate_together(workbench, pending, look)
        still_open = []
        for case in pending:
            try:
                comparison = workbench.settle_look(case, look)
                if comparison is None:
                    still_open.append(case)
                else:
                    settled[case.id] = (comparison, workbench.looks(case)[look])
            except Exception as error:  # one broken case must not lose the rest of the report
                log.error("%s: %s", case.id, error)
                settled[case.id] = error
        pending, look = still_open, look + 1
    return settled


def case_rows(workbench: Workbench, case: Case, settled: tuple[Comparison, int] | Exception) -> list[dict[str, Any]]:
    """Report rows of one case, one per metric of its task, each on the items its headline gate settled on; a case
    that cannot run gives skipped rows."""
    metrics = task_metrics(case)
    base = {"model": case.model.name, "method": case.quant.method, "config": case.quant.label,
            "quant": case.quant_name, "task": case.task.name}
    try:
        if isinstance(settled, Exception):
            raise settled
        headline, n = settled
        comparisons = [headline, *(workbench.compare(case, metric, n=n) for metric in metrics[1:])]
        baseline_model, _ = workbench.baseline(case.model)
        quantized = workbench.quantized(case.model, case.quant_name, case.quant)
    except Exception as error:  # one broken case must not lose the rest of the report
        log.error("%s: %s", case.id, error)
        return [{**base, "metric": metric, "skipped_reason": f"{type(error).__name__}: {error}"} for metric in metrics]
    bytes_baseline, bytes_quantized = model_bytes(baseline_model), model_bytes(quantized.model)
    planned = workbench.looks(case)[-1]
    rows = []
    for comparison in comparisons:
        extra = comparison.extra
        flips = extra.get("flips") or {}
        rows.append({
            **base, "metric": comparison.metric,
            "baseline": comparison.baseline.metrics[comparison.metric],
            "quantized": comparison.quantized.metrics[comparison.metric],
            "retention": comparison.retention,
            "retention_ci_low": comparison.interval[0] if comparison.interval else None,
            "retention_ci_high": comparison.interval[1] if comparison.interval else None,
            "n": comparison.baseline.n, "n_planned": planned,
            "model_bytes_baseline": bytes_baseline, "model_bytes_quantized": bytes_quantized,
            "memory_reduction": bytes_baseline / bytes_quantized,
            "verdict": comparison.verdict.status, "verdict_reason": comparison.verdict.reason,
            "headline_metric": comparison.metric == metrics[0], "p_at_least_threshold": comparison.p_value,
            "detectable_drop": extra.get("detectable_drop"), "spread": extra.get("spread"),
            "flips_correct_to_wrong": flips.get("correct_to_wrong"),
            "flips_wrong_to_correct": flips.get("wrong_to_correct"),
            "mcnemar_p": extra.get("mcnemar_p"), "chance": extra.get("chance"), "bm25": extra.get("bm25"),
            "agreement": extra.get("agreement"), "score_correlation": extra.get("score_correlation"),
            **{name: extra.get(name) for name in DIVERGENCE_METRICS},
            "roc_auc_baseline": extra.get("roc_auc_baseline"), "roc_auc_quantized": extra.get("roc_auc_quantized"),
            "quantize_seconds": quantized.quantize_seconds, "quantize_peak_bytes": quantized.quantize_peak_bytes,
            "calibration": quantized.calibration,
            **quantized.layer_counts(), "backend": case.quant.backend or case.quant.method, "kernel": quantized.kernel,
            "skipped_reason": None,
        })
    return rows


def skipped_rows(case: Case, reason: str) -> list[dict[str, Any]]:
    return [{"model": case.model.name, "method": case.quant.method, "config": case.quant.label,
             "quant": case.quant_name, "task": case.task.name, "metric": metric, "skipped_reason": reason}
            for metric in task_metrics(case)]


def speedup_cell(row: dict[str, Any], name: str = "decode_speedup") -> str:
    """A speed-up (``decode_speedup``, ``compiled_decode_speedup``, ``compiled_ttft_speedup``) with its range over the
    paired rounds, or why this run cannot say."""
    if row.get(f"{name}_unmeasurable"):
        return row[f"{name}_unmeasurable"]
    if row.get(name) is None:
        return "–"
    return f"{row[name]:.2f}× [{row[f'{name}_low']:.2f}, {row[f'{name}_high']:.2f}]"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _megabytes(size: int | None) -> str:
    """A byte count as whole MB (10^6 bytes), or "–" where it was not measured."""
    return "–" if size is None else f"{size / 1e6:.0f}"


# A task's verdict is its worst metric's, in this order; the headline counts rows by verdict.
VERDICT_ORDER = ("fail", "inconclusive", "pass", "uninformative")


def headline(report: dict[str, Any]) -> list[str]:
    """The first screen: per model, one line per quant config with each task's verdict (its worst metric's), the
    stored size and the decode speed-up; the fail and inconclusive reasons; the counts; skipped cases as one line
    per reason; and last, one verdict for the whole run (``gate.joint_verdict`` over each case's headline gate)."""
    measured = [r for r in report["rows"] if not r.get("skipped_reason")]
    timing = {(p["model"], p["quant"]): p for p in report.get("performance", []) if not p.get("skipped_reason")}
    lines, reasons = [], []
    for model in dict.fromkeys(r["model"] for r in measured):
        rows = [r for r in measured if r["model"] == model]
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        base = timing.get((model, "baseline"), {})
        lines += [f"**{model}** (baseline {rows[0]['model_bytes_baseline'] / 1e6:.0f} MB"
                  + (f", decode {base['decode_tokens_per_s']:.1f} tok/s" if base else "") + ")", "",
                  "| config | " + " | ".join(tasks) + " | MB (×) | decode speed-up |",
                  "|" + "---|" * (len(tasks) + 3)]
        for quant in dict.fromkeys(r["quant"] for r in rows):
            config_rows = [r for r in rows if r["quant"] == quant]
            cells = []
            for task in tasks:
                task_rows = [r for r in config_rows if r["task"] == task]
                worst = min(task_rows, key=lambda r: VERDICT_ORDER.index(r["verdict"]), default=None)
                cells.append("–" if worst is None else worst["verdict"])
                if worst is not None and worst["verdict"] in ("fail", "inconclusive"):
                    reasons.append(f"- {model} {quant} {task} ({worst['metric']}): {worst['verdict']}: "
                                   f"{worst['verdict_reason']}")
            first, speed = config_rows[0], timing.get((model, quant), {})
            cells += [f"{first['model_bytes_quantized'] / 1e6:.0f} ({first['memory_reduction']:.1f}×)",
                      speedup_cell(speed)]
            lines.append(f"| {quant} | " + " | ".join(cells) + " |")
        sizes = {task: max(r.get("n_planned") or r["n"] for r in rows if r["task"] == task) for task in tasks}
        lines += ["", "Items: " + ", ".join(f"{task} {n}" for task, n in sizes.items()) + "."]
        idle = [task for task in tasks if all(r["verdict"] == "uninformative" for r in rows if r["task"] == task)]
        if idle:
            lines.append(f"Uninformative for {model} in every config: {', '.join(idle)} (the baseline is at chance or "
                         "solves too few items to gate retention on); the profile keeps their item counts small.")
        lines.append("")
    counts = {v: sum(r["verdict"] == v for r in measured) for v in VERDICT_ORDER}
    lines.append(f"Rows: {len(measured)} measured: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")
    saved = sequential_line(measured)
    if saved:
        lines.append(saved)
    lines += reasons
    skipped: dict[str, list[dict]] = {}
    for row in report["rows"]:
        if row.get("skipped_reason"):
            skipped.setdefault(row["skipped_reason"], []).append(row)
    for reason, rows in skipped.items():
        models = ", ".join(dict.fromkeys(r["model"] for r in rows))
        cases = len({(r["model"], r["quant"], r["task"]) for r in rows})
        lines.append(f"Skipped, {reason}: {cases} cases ({len(rows)} rows) of {models}.")
    lines.append(joint_verdict([(f"{r['model']}-{r['quant']}-{r['task']}", r.get("p_at_least_threshold"), r["verdict"])
                                for r in measured if r.get("headline_metric")]).line() + ".")
    return lines


def items_cell(row: dict[str, Any]) -> str:
    """The items a row read: "16 of 40" where its sequential gate stopped before the profile's n."""
    planned = row.get("n_planned")
    return f"{row['n']} of {planned}" if planned and row["n"] < planned else str(row["n"])


def sequential_line(rows: list[dict[str, Any]]) -> str | None:
    """How much the sequential gates saved: cases decided before their last look, and the items each model pair
    read against the profile's (rows of a case's other metrics read the same items and count once)."""
    headline_rows = [r for r in rows if r.get("headline_metric") and r.get("n_planned")]
    early = [r for r in headline_rows if r["n"] < r["n_planned"]]
    if not early:
        return None
    read, planned = sum(r["n"] for r in headline_rows), sum(r["n_planned"] for r in headline_rows)
    return (f"Sequential gates: {len(early)} of {len(headline_rows)} cases decided before the profile's n; "
            f"{read} of {planned} items read per model ({1 - read / planned:.0%} fewer).")


def kernel_legend(report: dict[str, Any]) -> dict[str, str]:
    """A short key (K1, K2, ...) for each kernel description, which is long and repeats on every row."""
    kernels = dict.fromkeys(r["kernel"] for r in report["rows"] + report.get("performance", []) if r.get("kernel"))
    return {kernel: f"K{number}" for number, kernel in enumerate(kernels, start=1)}


def markdown(report: dict[str, Any]) -> str:
    """The detailed table: every measured row (skipped ones are summed up in the headline), kernels by their key."""
    header = ["model", "method", "config", "task", "metric", "n", "baseline", "quantized", "retention [95% CI]",
              "detectable drop", "flips (c→w / w→c)", "McNemar p", "chance / BM25", "mean KLD / same top",
              "MB base → quant (×)", "TTFT ms / decode tok/s [kernel]", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    legend = kernel_legend(report)
    for row in (r for r in report["rows"] if not r.get("skipped_reason")):
        interval = (f" [{row['retention_ci_low']:.3f}, {row['retention_ci_high']:.3f}]"
                    if row["retention_ci_low"] is not None else "")
        flips = ("–" if row["flips_correct_to_wrong"] is None
                 else f"{row['flips_correct_to_wrong']} / {row['flips_wrong_to_correct']}")
        divergence = ("–" if row["mean_kld"] is None
                      else f"{row['mean_kld']:.4f} ± {row['mean_kld_se']:.4f} / {row['same_top_p']:.3f}")
        memory = (f"{row['model_bytes_baseline'] / 1e6:.0f} → {row['model_bytes_quantized'] / 1e6:.0f} "
                  f"({row['memory_reduction']:.2f}×)")
        speed = ("not timed" if row.get("ttft_ms") is None else
                 f"{row['ttft_ms']:.0f} / {row['decode_tokens_per_s']:.1f} [{legend[row['kernel']]}]")
        cells = [row["model"], row["method"], row["config"], row["task"], row["metric"], items_cell(row),
                 _fmt(row["baseline"], 4), _fmt(row["quantized"], 4), _fmt(row["retention"]) + interval,
                 _fmt(row.get("detectable_drop")), flips,
                 _fmt(row["mcnemar_p"]), _fmt(row["chance"] if row["bm25"] is None else row["bm25"], 4),
                 divergence, memory, speed, row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quantization_table(report: dict[str, Any]) -> str:
    seen, lines = set(), ["| model | quant | config | quantize s | quantize peak MB above what was loaded | calibration | "
                          "fallback layers | rebuilt in an empty cache |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        key = (row["model"], row["quant"])
        if key in seen or row.get("skipped_reason"):
            continue
        seen.add(key)
        built = "– (a checkpoint)" if row["quantize_seconds"] is None else f"{row['quantize_seconds']:.1f}"
        lines.append(f"| {row['model']} | {row['quant']} | {row['config']} | {built} | "
                     f"{_megabytes(row.get('quantize_peak_bytes'))} | {row['calibration'] or 'none'} | "
                     f"{row['fallback_layers']} / {row['quantized_layers']} | {row.get('rebuild') or 'not checked'} |")
    return "\n".join(lines)


PROMPT_COLUMNS = ["compiled TTFT ms", "compiled TTFT speed-up vs the faster baseline eager",
                  "compiled prompt package MB (its own weights)"]


def performance_table(report: dict[str, Any]) -> str:
    """The timing rows as a table; the compiled prompt's columns only when the run compiled prompts."""
    rows = report.get("performance", [])
    prompts = any("compiled_ttft_ms" in row or "compiled_ttft_unavailable" in row for row in rows)
    header = ["model", "variant", "dtype", "kernel", "TTFT ms (prefill)", "decode ms/token", "decode tok/s",
              "output tok/s (incl. prefill)", "batch decode tok/s", "model MB", "memory ×", "decode speed-up",
              "peak memory MB (weights + working)", "MB read / token", "GB/s achieved (share of measured)", "roofline ms/token",
              "compiled decode ms/token (share)", "compiled decode speed-up vs baseline eager",
              *(PROMPT_COLUMNS if prompts else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    legend = kernel_legend(report)
    for row in rows:
        if row.get("skipped_reason"):
            cells = [row["model"], row["quant"]] + [""] * (len(header) - 3) + [f"not timed: {row['skipped_reason']}"]
        else:
            cells = [row["model"], row["quant"], row["dtype"], legend[row["kernel"]], _fmt(row["ttft_ms"], 0),
                     _fmt(row["decode_ms_per_token"], 1), _fmt(row["decode_tokens_per_s"], 1),
                     _fmt(row["output_tokens_per_s"], 1), f"{row['batch_decode_tokens_per_s']:.1f} (batch {row['batch']})",
                     _megabytes(row["model_bytes"]), _fmt(row.get("memory_reduction"), 2),
                     speedup_cell(row), _megabytes(row["peak_memory_bytes"]), _megabytes(row["bytes_per_token"]),
                     f"{row['achieved_gb_per_s']:.1f} ({row['bandwidth_share']:.0%})",
                     _fmt(row["roofline_ms_per_token"], 2),
                     f"{row['compiled_decode_ms_per_token']:.2f} ({row['compiled_bandwidth_share']:.0%})"
                     if "compiled_decode_ms_per_token" in row else row.get("compiled_decode_unavailable", "–"),
                     speedup_cell(row, "compiled_decode_speedup")]
            if prompts:
                cells += [_fmt(row["compiled_ttft_ms"], 0) if "compiled_ttft_ms" in row
                          else row.get("compiled_ttft_unavailable", "–"), speedup_cell(row, "compiled_ttft_speedup"),
                          _megabytes(row.get("compiled_prompt_package_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "latest.json", folder / "latest.md"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    pictures = [(title, figure) for title, figure in (
        ("retention per task and config", retention_chart(report, folder / "retention.png")),
        ("mean KLD per config", kld_chart(report, folder / "kld.png"))) if figure is not None]
    machine = ", ".join(f"{k}={v}" for k, v in report["machine"].items())
    text = [
        "# quant report", "", f"Command: `{report['command']}`  ", f"Profile: `{report['profile']}`  ",
        f"Machine: {machine}", "", *headline(report), "",
        *[f"![{title}]({figure.name})" for title, figure in pictures], "", "## Results", "", markdown(report), "",
        "Kernels: " + "; ".join(f"{key} = {kernel}" for kernel, key in kernel_legend(report).items()), "",
        "## Performance", "", PERF_NOTE, "",
        performance_table(report), "", "## Quantization", "", quantization_table(report), "",
        "## Notes", "", *[f"- {note}" for note in NOTES], "",
    ]
    md_path.write_text("\n".join(text))
    return json_path, md_path


PERF_COLUMNS = ("kernel", "ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "batch_decode_tokens_per_s")


Variant = tuple[ModelSpec, str | None, torch.dtype | None]  # model, quant config (None: baseline), baseline recast


def timed_variants(cases: list[Case]) -> list[Variant]:
    """The model variants the cases use: the baseline in its own dtype (and in bf16 when that is fp32, the cheap
    alternative a user would compare with), and each quantized model."""
    variants: dict[tuple[str, str | None, Any], Variant] = {}
    for case in cases:
        for dtype in [None, torch.bfloat16] if case.model.dtype == "float32" else [None]:
            variants[(case.model.name, None, dtype)] = (case.model, None, dtype)
        variants[(case.model.name, case.quant_name, None)] = (case.model, case.quant_name, None)
    return list(variants.values())


def machine_line(device: str, bandwidth: float) -> dict[str, Any]:
    """The machine facts a timing table is read against, with the memory bandwidth measured in the same run."""
    return {**machine_facts(device), "memory_bandwidth_gb_per_s": round(bandwidth / 1e9, 2)}


def performance_rows(workbench: Workbench, variants: list[Variant], bandwidth: float,
                     settings: PerfSettings | None = None) -> list[dict[str, Any]]:
    """One timing per variant, quantized models on their fastest kernel, each with its decode against the memory
    roofline at ``bandwidth`` bytes/s; time to first token and decode are timed interleaved across each model's
    variants (``perf.interleaved_latency``), and a speed-up is the median of per-round ratios with their range, or
    the reason it is not measurable on this run. ``settings``: the profile's unless given."""
    rows, served = [], {}
    for number, (spec, quant_name, dtype) in enumerate(variants, start=1):
        label = variant_label(quant_name, dtype)
        row = {"model": spec.name, "quant": label}
        log.info("timing %d/%d: %s %s", number, len(variants), spec.name, label)
        try:
            model, kernel = workbench.runnable(spec, quant_name, dtype)
            own = settings or workbench.perf_settings(spec)
            timing = measure(model, workbench.wikitext_ids(spec)[None], workbench.device_for(spec), own, latency=False)
            rows.append({**row, **timing, "kernel": kernel, "dtype": dtype_name(next(model.parameters()).dtype)})
            served[(spec.name, label)] = model
        except Exception as error:  # a variant that cannot be timed is a row that says why, not a hole
            log.error("timing %s %s: %s", spec.name, label, error)
            rows.append({**row, "skipped_reason": f"{type(error).__name__}: {error}"})
    for spec in dict.fromkeys(spec for spec, _, _ in variants):
        own_rows = [r for r in rows if r["model"] == spec.name and (spec.name, r["quant"]) in served]
        baselines = {variant_label(None, dtype) for model, quant_name, dtype in variants
                     if model == spec and quant_name is None}
        if own_rows:
            _add_interleaved_latency(workbench, spec, own_rows, served, settings or workbench.perf_settings(spec),
                                     bandwidth, baselines)
    return rows


def _add_interleaved_latency(workbench: Workbench, spec: ModelSpec, rows: list[dict[str, Any]],
                             served: dict[tuple[str, str], torch.nn.Module], settings: PerfSettings,
                             bandwidth: float, baselines: set[str]) -> None:
    """Time to first token and decode of one model's variants, interleaved, into their rows: medians over the
    rounds, the rounds themselves, the roofline, and each variant's speed-up over the baseline with its range."""
    models = {row["quant"]: served[(spec.name, row["quant"])] for row in rows}
    log.info("timing %s: %d variants interleaved, %d rounds", spec.name, len(models), settings.rounds)
    rounds = interleaved_latency(models, workbench.wikitext_ids(spec)[None], workbench.device_for(spec), settings,
                                 settings.rounds)
    busy = rounds.busy_reason()
    for row in rows:
        ttft, decode_seconds = rounds.ttft[row["quant"]], rounds.decode[row["quant"]]
        row.update(latency_figures(statistics.median(ttft), statistics.median(decode_seconds), settings.new_tokens),
                   ttft_ms_rounds=[t * 1000 for t in ttft],
                   decode_ms_per_token_rounds=[t / settings.new_tokens * 1000 for t in decode_seconds],
                   probe_spread=rounds.probe_spread, others_cpu_share_rounds=rounds.others_cpu_share)
        if row["quant"] in rounds.compile_failures:
            row["compiled_decode_unavailable"] = f"not compiled: {rounds.compile_failures[row['quant']]}"
        if row["quant"] in rounds.prompt_failures:
            row["compiled_ttft_unavailable"] = f"not compiled: {rounds.prompt_failures[row['quant']]}"
        if row["quant"] in rounds.compiled_decode:
            compiled = rounds.compiled_decode[row["quant"]]
            row.update(decode_figures(statistics.median(compiled), settings.new_tokens, prefix="compiled_"),
                       compiled_decode_ms_per_token_rounds=[t / settings.new_tokens * 1000 for t in compiled])
        if row["quant"] in rounds.compiled_ttft:
            compiled_ttft = rounds.compiled_ttft[row["quant"]]
            row.update(compiled_ttft_ms=statistics.median(compiled_ttft) * 1000,
                       compiled_ttft_ms_rounds=[t * 1000 for t in compiled_ttft])
        if row["quant"] in rounds.package_bytes:
            row["compiled_prompt_package_bytes"] = rounds.package_bytes[row["quant"]]
        row.update(roofline(row, bandwidth))
        log.info("timed %s %s: decode %.2f ms/token eager%s; %.0f MB read per token, roofline %.2f ms", spec.name,
                 row["quant"], row["decode_ms_per_token"],
                 f", {row['compiled_decode_ms_per_token']:.2f} compiled" if "compiled_decode_ms_per_token" in row else "",
                 row["bytes_per_token"] / 1e6, row["roofline_ms_per_token"])
    baseline = next((row for row in rows if row["quant"] == "baseline"), None)
    if baseline is None:
        return
    for row in rows:
        row["memory_reduction"] = baseline["model_bytes"] / row["model_bytes"]
        row.update(_speedup_fields("decode_speedup", rounds.decode["baseline"], rounds.decode[row["quant"]], busy,
                                   judged=row is not baseline))
        if row["quant"] in rounds.compiled_decode:  # against the eager baseline: what compiling the model buys
            row.update(_speedup_fields("compiled_decode_speedup", rounds.decode["baseline"],
                                       rounds.compiled_decode[row["quant"]], busy))
        if row["quant"] in rounds.compiled_ttft:  # against the faster baseline dtype in each round: a user's choice
            row.update(_speedup_fields("compiled_ttft_speedup", _fastest_baseline(rounds.ttft, baselines),
                                       rounds.compiled_ttft[row["quant"]], busy))


def _fastest_baseline(seconds: dict[str, list[float]], baselines: set[str]) -> list[float]:
    """Per round, the fastest of the timed ``baselines`` (the baseline's dtypes, by their variant labels)."""
    return [min(times) for times in zip(*(times for name, times in seconds.items() if name in baselines))]


def _speedup_fields(name: str, baseline_seconds: list[float], seconds: list[float], busy: str | None,
                    judged: bool = True) -> dict[str, Any]:
    """A row's ``name`` (median of the paired rounds' ratios), its range, and why it is not measurable, if it is not
    (``judged`` False: a ratio of the baseline to itself, reported as its range only)."""
    speedup = paired_speedup(baseline_seconds, seconds)
    reason = unmeasurable_reason(speedup, busy) if judged else None
    return {name: None if reason else speedup[0], f"{name}_low": speedup[1], f"{name}_high": speedup[2],
            f"{name}_unmeasurable": reason}


def evaluate_together(workbench: Workbench, cases: list[Case], look: int) -> None:
    """Each model's variants of a task that runs the baseline beside them (WikiText) in one pass up to their
    ``look``, one baseline forward per batch for all (``Workbench.evaluate_together``). A variant that cannot be
    built, or a task whose items cannot be read, is left out here; its case reports the error."""
    groups: dict[tuple[str, str, int], list[Case]] = {}
    for case in cases:
        if kind_of(case.task).uses_reference:
            with contextlib.suppress(Exception):
                groups.setdefault((case.model.name, case.task.name, workbench.looks(case)[look]), []).append(case)
    for (_, task_name, n), group in groups.items():
        ready = []
        for case in group:
            try:
                workbench.quantized(case.model, case.quant_name, case.quant)
                ready.append(case.quant_name)
            except Exception as error:
                log.error("%s: %s", case.id, error)
        workbench.evaluate_together(group[0].model, task_name, ready, n)


def rebuilds(workbench: Workbench, cases: list[Case]) -> dict[tuple[str, str], str]:
    """Each built config of ``cases`` quantized a second time in an empty cache: bit-identical, or which tensors
    differ (``quant quantize --reproducible`` adds what that does to perplexity)."""
    checked = {}
    for case in cases:
        key = (case.model.name, case.quant_name)
        if key not in checked and not case.quant.checkpoint:
            log.info("rebuilding %s %s in an empty cache", *key)
            checked[key] = workbench.candidates.rebuild(case.model, case.quant)[0].describe()
    return checked


def build(workbench: Workbench, cases: list[Case], skipped: list[tuple[Case, str]], command: str,
          reproducible: bool = False) -> dict[str, Any]:
    """The report's rows and timings; with ``reproducible``, every built config is quantized twice."""
    settled = settle_cases(workbench, cases)
    rows = []
    for case in cases:
        rows += case_rows(workbench, case, settled[case.id])
    checked = rebuilds(workbench, cases) if reproducible else {}
    for row in rows:
        row["rebuild"] = checked.get((row["model"], row.get("quant")))
    for case, reason in skipped:
        rows += skipped_rows(case, reason)
    bandwidth = memory_bandwidth(workbench.settings.device)
    log.info("memory bandwidth: %.1f GB/s (copy of a 256 MiB buffer, best of 5)", bandwidth / 1e9)
    performance = performance_rows(workbench, timed_variants(cases), bandwidth)
    timings = {(p["model"], p["quant"]): p for p in performance if not p.get("skipped_reason")}
    for row in rows:  # each accuracy row carries the speed of the model that produced it
        timing = timings.get((row["model"], row.get("quant")), {})
        row.update({column: timing.get(column) for column in PERF_COLUMNS})
    machine = machine_line(workbench.settings.device, bandwidth)
    return {"machine": machine, "command": command, "profile": workbench.settings.profile,
            "rows": rows, "performance": performance}
