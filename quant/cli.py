"""Command line: ``python -m quant report`` evaluates the matrix and writes reports/latest.{md,json};
``python -m quant quantize`` builds (or loads from the cache) one quantized model and prints its log;
``python -m quant replica`` saves a random-weight replica of a study model;
``python -m quant history`` plots the saved benchmark runs;
``python -m quant crosscheck lm-eval --task boolq`` scores the same items with lm-evaluation-harness and compares;
``python -m quant perf MODEL`` times its variants' decode, eager and compiled, against the memory roofline;
``python -m quant sensitivity MODEL`` ranks its linears by the divergence each causes quantized alone;
``python -m quant check --base MODEL --candidate FOLDER`` judges a quantized checkpoint against its base model."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from quant import noise, plan, report
from quant.backends import BackendUnavailable
from quant.backends.checkpoint import CheckpointError
from quant.config import CALIB_DTYPES, ConfigError, QuantConfig, data_dir
from quant.project import MATRIX_ENV, cache_dir, current
from quant.crosscheck import LM_EVAL_TASKS, crosscheck
from quant.data import DataError, missing_files
from quant.data import load as load_data
from quant.decide import AVERAGE, correlations, frontier, load_report, parse_size, plot_pareto, points, recommend
from quant.history import compare_runs, load_runs
from quant.history import plot as plot_history
from quant.kinds.generate import fewshot_exemplars
from quant.kinds.harness import offline_problem
from quant.matrix import Case, Matrix, load_matrix
from quant.models import DTYPES, ModelSpec, ModelUnavailable
from quant.compiled import use_compile_cache
from quant.perf import memory_bandwidth
from quant.pipeline import CALIBRATION_SOURCE, Workbench
from quant.qlinear import dequantized_weights
from quant.replicas import REPLICAS, save_replica
from quant.scaffold import init_project
from quant.sensitivity import heatmap, layer_sensitivity, mixed_precision_overrides
from quant.snapshots import check_hardware, hardware_class
from quant.tasks import HARNESS, evaluate, select_items

MATRIX_HELP = f"the matrix file (default: ${MATRIX_ENV}, else [tool.quant] matrix in the project's pyproject.toml)"
# What a user can fix: printed as one line naming the file, field, variable or flag, with exit status 2.
USER_ERRORS = (ConfigError, DataError, ModelUnavailable, BackendUnavailable, CheckpointError)


def _add_inputs(command: argparse.ArgumentParser, reports: bool = True) -> None:
    """The options of a command that reads the matrix and the evaluation data (and writes under reports/)."""
    command.add_argument("--matrix", type=Path, default=None, help=MATRIX_HELP)
    command.add_argument("--data-dir", default=None, help="evaluation data folder (default: $QUANT_DATA_DIR)")
    if reports:
        command.add_argument("--out", type=Path, default=current().reports)


def _report_arguments(command: argparse.ArgumentParser) -> None:
    _add_inputs(command)
    command.add_argument("--profile", default="report", help="item counts from matrix.yaml profiles (report, test)")
    command.add_argument("--tier", choices=["cpu", "gpu"], default=None,
                         help="which models to run (default: gpu when CUDA is available, else cpu)")
    command.add_argument("-k", dest="select", default=None, help="only cases whose id contains this text")
    command.add_argument("--cadence", choices=["default", "slow", "all"], default="default",
                         help="which cases of matrix.yaml to run: the merge gate's (default; what `make report` fits "
                              "in 20 minutes on 2 CPU cores), the slow cadence's, or all; the others are listed as "
                              "skipped")
    command.add_argument("--dry-run", action="store_true",
                         help="print the plan (models, configs, tasks, item counts, kernels, snapshots, time) and "
                              "check that the data and each model's weights are reachable; run nothing")
    command.add_argument("--hardware", default=None,
                         help="hardware class for snapshots and measured costs (default: detected; h100 for a GPU "
                              "plan on a machine without CUDA)")
    command.add_argument("--reproducible", action="store_true",
                         help="quantize every built config a second time in an empty cache and say in the "
                              "quantization table whether the two came out bit-identical")


def _quantize_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a model name from matrix.yaml")
    command.add_argument("quant", help="a quant config name from matrix.yaml, e.g. gptq-w4g128")
    _add_inputs(command, reports=False)
    command.add_argument("--profile", default="report", help="profile whose calibration count applies")
    command.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the profile's)")
    command.add_argument("--calib-dtype", choices=CALIB_DTYPES, default=None,
                         help="GPTQ: dtype of the calibration forward's matmuls (default: the config's, float32)")
    command.add_argument("--calib-chunk", type=int, default=None,
                         help="calibration samples per forward of a block, to bound peak memory (default: all at once)")
    command.add_argument("--reproducible", action="store_true",
                         help="build it again in an empty cache and compare every tensor; when they differ, the "
                              "WikiText perplexity of both builds on the profile's windows")


def _replica_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a study model: " + ", ".join(sorted(REPLICAS)))
    command.add_argument("--tokenizer", required=True,
                         help="a tokenizer folder, or a matrix model whose tokenizer is local (e.g. smollm2-135m)")
    command.add_argument("--out", type=Path, required=True,
                         help="the folder to write (load it with QUANT_MODEL_<NAME>)")
    command.add_argument("--small", action="store_true", help="two narrow blocks instead of the published size")
    command.add_argument("--matrix", type=Path, default=None, help=MATRIX_HELP)


def _history_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--storage", type=Path, default=current().benchmarks,
                         help="pytest-benchmark storage folder (default: .benchmarks)")
    command.add_argument("--out", type=Path, default=current().reports / "history.png")


def _crosscheck_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("tool", choices=["lm-eval"], help="the reference implementation")
    command.add_argument("--task", required=True, choices=sorted(LM_EVAL_TASKS))
    command.add_argument("--limit", type=int, default=None,
                         help="items (the suite's seeded selection; default: the profile's)")
    command.add_argument("--model", default="smollm2-135m", help="a model name from matrix.yaml")
    command.add_argument("--quant", default=None,
                         help="a quant config name: check the quantized model instead of the baseline")
    command.add_argument("--profile", default="report", help="profile whose item count and task options apply")
    command.add_argument("--batch-size", type=int, default=None,
                         help="both evaluators' batch size (default: the task's)")
    _add_inputs(command)


def _perf_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a model name from matrix.yaml")
    command.add_argument("--quant", action="append", default=None,
                         help="a quant config to time (repeat the flag; default: every config the model's cases use)")
    command.add_argument("--compiled", default="inductor",
                         help="torch.compile backend of the static-cache decode, or 'none' (default: %(default)s)")
    command.add_argument("--cpp-wrapper", action="store_true",
                         help="inductor's C++ wrapper around the compiled step (faster steps, minutes of compiling)")
    command.add_argument("--compiled-prefill", action="store_true",
                         help="compile the prompt's forward too, ahead of time, with frozen weights and autotuned "
                              "GEMM templates (AMX int4/int8 kernels), and time it: the compiled TTFT (minutes of "
                              "compiling per variant the first time; the package is kept in the result cache)")
    command.add_argument("--profile", default="report", help="profile whose perf settings apply")
    _add_inputs(command)


def _sensitivity_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a model name from matrix.yaml")
    command.add_argument("--quant", default="rtn-w4g128",
                         help="an rtn config from matrix.yaml (default: %(default)s)")
    command.add_argument("--windows", type=int, default=None,
                         help="WikiText windows to measure on (default: the profile's wikitext count)")
    command.add_argument("--budget", type=float, default=0.10,
                         help="mixed precision: the most sensitive linears go to 8 bits while the quantized "
                              "linears' bytes grow by at most this share (default: %(default)s)")
    command.add_argument("--profile", default="test", help="profile whose wikitext window count applies")
    _add_inputs(command)


def _check_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--base", required=True, help="the matrix model it was quantized from, e.g. smollm2-135m")
    command.add_argument("--candidate", type=Path, required=True, help="the checkpoint folder")
    command.add_argument("--tasks", default=None,
                         help="comma-separated tasks (default: every task the matrix runs on the base model)")
    command.add_argument("--like", default=None,
                         help="gate as the matrix gates this quant config's cases (default: the base model's first "
                              "case of each task)")
    command.add_argument("--profile", default="report", help="item counts from matrix.yaml profiles (report, test)")
    _add_inputs(command)


def _report_reader_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--report", type=Path, default=current().reports / "latest.json",
                         help="a report's JSON (default: %(default)s)")
    command.add_argument("--model", default="smollm2-135m", help="a model of the report")


def _pareto_arguments(command: argparse.ArgumentParser) -> None:
    _report_reader_arguments(command)
    command.add_argument("--task", default=AVERAGE, help=f"a task's retention, {AVERAGE!r} (the mean over the "
                                                         "model's informative tasks) or 'kld' (mean KLD)")
    command.add_argument("--out", type=Path, default=None, help="the PNG (default: next to the report)")


def _recommend_arguments(command: argparse.ArgumentParser) -> None:
    _report_reader_arguments(command)
    command.add_argument("--task", default=AVERAGE,
                         help=f"a task's retention, or {AVERAGE!r} (the mean over the model's informative tasks)")
    command.add_argument("--max-memory", default=None, help="largest model size, e.g. 150MB")
    command.add_argument("--min-retention", type=float, default=None,
                         help="smallest retention lower bound (95%% CI) on --task")
    command.add_argument("--min-decode-speedup", type=float, default=None, help="e.g. 2 for twice the baseline")


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its arguments and what runs it (returning the exit status)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quant", description="Regression suite for quantized LLMs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(subparsers.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        args = build_parser().parse_args(argv)  # its defaults read the project's pyproject.toml
        args.command_line = "quant " + shlex.join(argv if argv is not None else sys.argv[1:])  # recorded with outputs
        return COMMANDS[args.command].run(args)
    except USER_ERRORS as error:
        print(f"quant: {error}", file=sys.stderr)
        return 2


def report_command(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.matrix)
    device = _device()
    tier = args.tier or ("gpu" if device == "cuda" else "cpu")
    if args.hardware:
        check_hardware(args.hardware, hardware_class("cuda") if device == "cuda" else None)
    selected = [c for c in matrix.cases if not args.select or args.select in c.id]
    if not selected:
        raise ConfigError(f"-k {args.select!r} matches no case of {matrix.path}; case ids look like "
                          f"{matrix.cases[0].id}")
    cases = [c for c in selected if c.model.tier == tier and args.cadence in ("all", c.cadence)]
    skipped = [(c, f"tier {c.model.tier}: not run in this {tier} report") for c in selected if c.model.tier != tier]
    skipped += [(c, f"cadence {c.cadence}: not run in this report (--cadence {c.cadence} or all runs it)")
                for c in selected if c.model.tier == tier and c not in cases]
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), device)
    if args.dry_run:
        spreads = plan.cached_spreads(workbench, cases)
        print(plan.describe(matrix, cases, args.profile, tier, current().baselines, args.hardware, spreads))
        return dry_run_inputs(cases, args.data_dir, runs_here=tier == ("gpu" if device == "cuda" else "cpu"))
    use_compile_cache()
    result = report.build(workbench, cases, skipped, args.command_line, args.reproducible)
    json_path, md_path = report.write(result, args.out)
    print("\n".join(report.headline(result)))
    print(f"\nwrote {md_path} and {json_path}")
    return 0


def dry_run_inputs(cases: list[Case], data_dir_option: str | None, runs_here: bool) -> int:
    """Print whether the data and each model's weights are reachable; 2 when something this run needs is not."""
    problems = missing_files(sorted({case.task.loader for case in cases if case.task.kind != HARNESS}),
                             data_dir(data_dir_option))
    for task in {case.task.name: case.task for case in cases if case.task.kind == HARNESS}.values():
        problems += [problem for problem in [offline_problem(task)] if problem]
    for spec in dict.fromkeys(case.model for case in cases):
        reason = spec.unavailable_reason()
        if reason:
            problems.append(reason)
    if not problems:
        print("inputs: the data files and every model's weights are reachable")
        return 0
    where = "" if runs_here else " (on this machine; the runner that runs this tier needs them)"
    print(f"inputs not reachable{where}:\n" + "\n".join(f"  {problem}" for problem in problems))
    return 2 if runs_here else 0


def _bench_compare_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--storage", type=Path, default=current().benchmarks,
                         help="pytest-benchmark storage folder (default: .benchmarks)")
    command.add_argument("--threshold", type=float, default=0.40,
                         help="a regression is a time ratio whose whole interval lies above 1 + this (default: "
                              "%(default)s)")


def bench_compare_command(args: argparse.Namespace) -> int:
    """The newest saved benchmark run against the one before it; exit 1 when a benchmark regressed."""
    runs = _saved_runs(args.storage)
    if len(runs) < 2:
        raise ConfigError(f"{args.storage}: {len(runs)} saved run(s); comparing needs two (make bench, twice)")
    older, newer = runs[-2], runs[-1]
    changes = compare_runs(older, newer)
    print(f"{newer['file']} against {older['file']}: time ratio new / old, median [interval over both runs' "
          f"rounds]; a regression when the interval lies above {1 + args.threshold:.2f}")
    for change in changes:
        print(f"  {change.name}: {change.old_median * 1000:.2f} -> {change.new_median * 1000:.2f} ms, "
              f"{change.ratio:.2f}x [{change.low:.2f}, {change.high:.2f}]: {change.verdict(args.threshold)}")
    regressions = [c for c in changes if c.verdict(args.threshold) == "regression"]
    print(f"{len(regressions)} regression(s) in {len(changes)} benchmarks")
    return 1 if regressions else 0


def _saved_runs(storage: Path) -> list[dict]:
    try:
        return load_runs(storage)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None


def _show_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("case", help="a case id, e.g. smollm2-135m-rtn-w4g128-wikitext")
    command.add_argument("--profile", default="test", help="the profile whose item counts and options apply "
                                                           "(default: %(default)s, what pytest runs)")
    command.add_argument("--matrix", type=Path, default=None, help=MATRIX_HELP)


def show_command(args: argparse.Namespace) -> int:
    """One case as the suite runs it, resolved from the matrix's defaults, the case entry, its quant config, its
    task and the profile: the single declarative record of the case."""
    matrix = load_matrix(args.matrix)
    cases = {case.id: case for case in matrix.cases}
    if args.case not in cases:
        close = [case_id for case_id in cases if args.case in case_id][:5]
        raise ConfigError(f"no case {args.case!r} in {matrix.path}" + (f"; did you mean {', '.join(close)}?" if close
                                                                       else f"; ids look like {matrix.cases[0].id}"))
    case = cases[args.case]
    limits = matrix.limits(args.profile, case.model.tier)
    record = {
        "case": case.id, "cadence": case.cadence, "expected_failure": case.expected_failure,
        "model": {k: v for k, v in dataclasses.asdict(case.model).items() if v is not None},
        "quant": {"name": case.quant_name, **case.quant.to_dict()},
        "task": {"name": case.task.name, "loader": case.task.loader, "kind": case.task.kind,
                 **case.task.options, **limits.get("options", {}).get(case.task.name, {})},
        "profile": {"name": args.profile, "items": limits.get(case.task.name),
                    **{k: limits[k] for k in ("calib_samples", "calib_chunk") if k in limits}},
        "gate": case.gate,
    }
    print(yaml.safe_dump(record, sort_keys=False, allow_unicode=True), end="")
    return 0


def _noise_arguments(command: argparse.ArgumentParser) -> None:
    _add_inputs(command)
    command.add_argument("cases", nargs="*", help="case ids (default: the default cadence's CPU-tier cases)")
    command.add_argument("--profile", default="test", help="the profile whose snapshots are measured (default: "
                                                           "%(default)s, what pytest compares)")
    command.add_argument("--write", action="store_true", help="replace matrix.yaml's measured_tolerances section")


def noise_command(args: argparse.Namespace) -> int:
    """Every case rerun under one thread, the AVX2 code path and doubled batches; the tolerances that covers."""
    matrix = load_matrix(args.matrix)
    cases = noise.cases_named(matrix, args.cases)
    started = time.strftime("%Y-%m-%d")
    reference, runs = noise.measure(matrix, args.profile, cases, data_dir(args.data_dir), cache_dir() / "noise",
                                   current().baselines)
    found = noise.deviations(reference, runs)
    tolerances = noise.measured_tolerances(cases, reference, found)
    print(noise.table(cases, found, tolerances))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise.json").write_text(json.dumps({"unchanged": reference, **runs}, indent=1) + "\n")
    print(f"wrote every run's values to {args.out / 'noise.json'}")
    if args.write:
        source = f"python -m quant noise --profile {args.profile} --write, {started}, {noise.this_machine()}"
        noise.write_section(matrix.path, noise.section_text(tolerances, source))
        print(f"wrote {len(tolerances)} cases' measured tolerances to {matrix.path}")
    return 0


def history_command(args: argparse.Namespace) -> int:
    _saved_runs(args.storage)
    print(f"wrote {plot_history(args.storage, args.out)}")
    return 0


def save_replica_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    if args.model not in REPLICAS:
        raise ConfigError(f"no replica of {args.model!r}; known: {sorted(REPLICAS)}")
    models = load_matrix(args.matrix).models
    if args.tokenizer in models:
        location, gguf_file = models[args.tokenizer].source()
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    spec = models.get(args.model)
    dtype = DTYPES[spec.dtype] if spec else torch.float32
    folder = save_replica(args.model, tokenizer, args.out, small=args.small, dtype=dtype)
    env = spec.override_env if spec else "QUANT_MODEL_<NAME>"
    print(f"wrote {folder} ({'small' if args.small else 'full-size'} {args.model}, vocabulary {len(tokenizer)}); "
          f"use it with {env}={folder}")
    return 0


def crosscheck_command(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.matrix)
    _check_names(matrix, args.model, [args.quant] if args.quant else [])
    folder = data_dir(args.data_dir)
    workbench = Workbench(matrix, args.profile, folder, _device())
    spec = matrix.models[args.model]
    task = workbench.task(spec, args.task)
    limit = args.limit if args.limit is not None else workbench.limits(spec).get(args.task)
    items = select_items(task, folder, limit, matrix.seed)
    exemplars = fewshot_exemplars(task, load_data(task.loader, folder))
    model, tokenizer = workbench.baseline(spec)
    if args.quant:
        config = workbench.calibration_config(spec, matrix.quant[args.quant])
        model = workbench.quantized(spec, args.quant, config).model
    with dequantized_weights(model):
        agreement = crosscheck(model, tokenizer, task, items, exemplars, args.batch_size)
    print("\n".join(agreement.lines()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"crosscheck-lm-eval-{args.task}-{args.model}-{args.quant or 'baseline'}.json"
    path.write_text(json.dumps({"command": args.command_line, **dataclasses.asdict(agreement),
                                "agrees": agreement.agrees}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if agreement.agrees else 1


def perf_command(args: argparse.Namespace) -> int:
    if args.cpp_wrapper and args.compiled != "inductor":
        raise ConfigError(f"--cpp-wrapper is inductor's; it cannot go with --compiled {args.compiled}")
    if args.compiled_prefill and args.compiled == "none":
        raise ConfigError("--compiled-prefill compiles with the --compiled backend; it cannot go with --compiled none")
    matrix = load_matrix(args.matrix)
    _check_names(matrix, args.model, args.quant or [])
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), _device())
    spec = matrix.models[args.model]
    variants = [v for v in report.timed_variants([c for c in matrix.cases if c.model is spec])
                if args.quant is None or v[1] is None]
    variants += [(spec, quant_name, None) for quant_name in args.quant or []]
    device = workbench.device_for(spec)
    use_compile_cache()
    profile_settings = workbench.perf_settings(spec)
    settings = dataclasses.replace(profile_settings, compiled=None if args.compiled == "none" else args.compiled,
                                   cpp_wrapper=args.cpp_wrapper or profile_settings.cpp_wrapper,
                                   compiled_prefill=args.compiled_prefill or profile_settings.compiled_prefill)
    bandwidth = memory_bandwidth(device)
    print(f"memory bandwidth of {device}: {bandwidth / 1e9:.1f} GB/s (copy of a 256 MiB buffer, best of 5)",
          flush=True)
    rows = report.performance_rows(workbench, variants, bandwidth, settings)
    machine = report.machine_line(device, bandwidth)
    timed = {"rows": [], "performance": rows, "machine": machine}
    print(f"{args.model}: {machine}\n{report.performance_table(timed)}")
    print("\n".join(f"{key}: {kernel}" for kernel, key in report.kernel_legend(timed).items()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"perf-{args.model}.json"
    path.write_text(json.dumps({"command": args.command_line, **timed}, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0


def sensitivity_command(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.matrix)
    _check_names(matrix, args.model, [args.quant])
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), _device())
    spec = matrix.models[args.model]
    windows = args.windows or workbench.limits(spec)["wikitext"]
    ranking = layer_sensitivity(workbench, spec, args.quant, windows)
    config = matrix.quant[args.quant]
    overrides = mixed_precision_overrides(ranking, config, args.budget)
    ranked = sorted(ranking, key=lambda row: row.mean_kld, reverse=True)
    stem = f"sensitivity-{args.model}-{args.quant}"  # (not Path.with_suffix: model names hold dots)
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    title = (f"{args.model}: mean KLD with one linear quantized alone ({config.label}, RTN), "
             f"{windows} WikiText windows")
    picture = heatmap(ranking, title, png_path)
    json_path.write_text(json.dumps({
        "command": args.command_line, "windows": windows, "quant": config.to_dict(),
        "ranking": [dataclasses.asdict(row) for row in ranked], "mixed_precision_overrides": overrides}, indent=1) + "\n")
    print(f"{title}; most sensitive first:")
    print("\n".join(f"  {row.mean_kld:.5f}  same top {row.same_top_p:.3f}  {row.name}" for row in ranked[:10]))
    print(f"  ... {len(ranked) - 10} more in {json_path}" if len(ranked) > 10 else "")
    print(f"mixed precision within +{args.budget:.0%} of the quantized linears' bytes: {len(overrides)} linears at "
          f"8 bits per channel; as a matrix.yaml quant entry:")
    print(f"  {args.quant}-mixed: " + json.dumps({**{k: v for k, v in config.to_dict().items()
                                                     if k in ("method", "bits", "group_size", "sym")},
                                                  "layer_overrides": overrides}))
    print(f"wrote {picture} and {json_path}")
    return 0


def decide_command(args: argparse.Namespace) -> int:
    candidates, baseline = points(load_report(args.report), args.model)
    if args.command == "pareto":
        out = args.out or args.report.parent / f"pareto-{args.model}-{args.task}.png"
        line = frontier(candidates, args.task)
        print(f"Pareto frontier ({args.task} against bytes), smallest first:")
        print("\n".join(f"  {p.quant}: {p.bytes / 1e6:.0f} MB, "
                        + (f"mean KLD {p.mean_kld:.4f}" if args.task == "kld" else
                           f"retention {p.score(args.task)[0]:.3f}") for p in line))
        print(f"wrote {plot_pareto(candidates, baseline, args.task, out)}")
        return 0
    max_bytes = parse_size(args.max_memory) if args.max_memory else None
    advice = recommend(candidates, args.task, max_bytes, args.min_retention, args.min_decode_speedup)
    print("\n".join(advice.lines(args.task)))
    return 0 if advice.chosen else 1


def correlate_command(args: argparse.Namespace) -> int:
    table = correlations(load_report(args.report), args.model)
    print(f"{args.model}: Spearman's rho across quant configs, task retention against the WikiText perplexity ratio "
          "and mean KLD (this model and data only; p: permutation test of no association)")
    for row in table:
        if "rho" in row:
            print(f"  {row['task']} vs {row['predictor']}: rho {row['rho']:+.3f}, n {row['n']}, p {row['p']:.3f}")
        else:
            print(f"  {row['task']}" + (f" vs {row['predictor']}" if "predictor" in row else "") + f": {row['note']}")
    return 0


def candidate_cases(matrix: Matrix, base: str, folder: Path, tasks: list[str] | None, like: str | None
                    ) -> list[Case]:
    """The cases that judge a checkpoint: the base model's tasks, each gated as the matrix gates ``like``'s case
    of that task (default: the base model's first case of the task)."""
    _check_names(matrix, base, [like] if like else [])
    own = [c for c in matrix.cases if c.model.name == base and (like is None or c.quant_name == like)]
    gates: dict[str, Case] = {}
    for case in own:
        gates.setdefault(case.task.name, case)
    unknown = sorted(set(tasks or []) - set(gates))
    if unknown or not gates:
        raise ConfigError(f"--tasks {', '.join(unknown) or '(none)'}: the matrix gates {base}"
                          f"{f' {like}' if like else ''} on {', '.join(sorted(gates)) or 'no task'}")
    name = f"checkpoint-{folder.name}"
    config = QuantConfig.from_dict({"checkpoint": str(folder.resolve())}, where="--candidate")
    matrix.quant[name] = config
    return [dataclasses.replace(gates[task], quant_name=name, quant=config, cadence="default", expected_failure=None)
            for task in (tasks or gates)]


def check_command(args: argparse.Namespace) -> int:
    if not args.candidate.is_dir():
        raise ConfigError(f"--candidate {args.candidate}: not a folder")
    matrix = load_matrix(args.matrix)
    tasks = args.tasks.split(",") if args.tasks else None
    cases = candidate_cases(matrix, args.base, args.candidate, tasks, args.like)
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), _device())
    workbench.quantized(cases[0].model, cases[0].quant_name, cases[0].quant)  # a broken checkpoint stops here
    result = report.build(workbench, cases, [], args.command_line)
    json_path, md_path = report.write(result, args.out / cases[0].quant_name)
    print("\n".join(report.headline(result)))
    print(f"\nwrote {md_path} and {json_path}")
    return 1 if any(row.get("verdict") == "fail" for row in result["rows"]) else 0


def _check_names(matrix: Matrix, model: str, quants: list[str]) -> None:
    """Refuse a model or quant config name that the matrix does not define, naming it and listing the known ones."""
    if model not in matrix.models:
        raise ConfigError(f"unknown model {model!r} in {matrix.path}; known: {', '.join(sorted(matrix.models))}")
    unknown = [name for name in quants if name not in matrix.quant]
    if unknown:
        raise ConfigError(f"unknown quant config {', '.join(map(repr, unknown))} in {matrix.path}; known: "
                          f"{', '.join(sorted(matrix.quant))}")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantize_command(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.matrix)
    _check_names(matrix, args.model, [args.quant])
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), _device(), args.calib_samples)
    spec = matrix.models[args.model]
    config = matrix.quant[args.quant]
    if args.calib_dtype:
        config = dataclasses.replace(config, calib_dtype=args.calib_dtype)
    if args.calib_chunk:
        config = dataclasses.replace(config, calib_chunk=args.calib_chunk)
    built = workbench.quantized(spec, args.quant, config)
    counts = built.layer_counts()
    errors = [r.output_error for r in built.records if r.output_error is not None]
    if built.quantize_seconds is None:
        print(f"{args.model} {args.quant}: a checkpoint, loaded with {counts['quantized_layers']} packed layers on "
              f"{built.kernel}")
        return 0
    peak = "" if built.quantize_peak_bytes is None else f", peak {built.quantize_peak_bytes / 1e6:.0f} MB above what was loaded"
    print(f"{args.model} {args.quant}: {counts['quantized_layers']} layers quantized in {built.quantize_seconds:.1f} s"
          f"{peak} (recorded when built, saving included; a cached model prints the original figures)")
    print(f"runs on: {built.kernel}")
    print(f"calibration: {built.calibration or 'none'}")
    if built.calibration and not config.backend:  # the in-house methods log where their time went
        hessians = sum(r.hessian_seconds or 0.0 for r in built.records)
        layers = sum(r.seconds for r in built.records)
        print(f"time: Hessians {hessians:.1f} s, per-layer quantization and packing {layers:.1f} s, the rest "
              f"(running the blocks over the calibration set) {built.quantize_seconds - hessians - layers:.1f} s")
    print(f"group-size fallbacks: {counts['fallback_layers']} layers")
    if errors:
        print(f"mean relative output error on the calibration inputs: {sum(errors) / len(errors):.4f}")
    return reproducibility(workbench, spec, args.quant, config) if args.reproducible else 0


def reproducibility(workbench: Workbench, spec: ModelSpec, quant_name: str, config: QuantConfig) -> int:
    """Build the candidate again in an empty cache and say whether it came out the same: 0 if bit-identical, else 1,
    with what the difference does to WikiText perplexity."""
    rebuild, second = workbench.candidates.rebuild(spec, config, load_if_different=True)
    print(f"rebuilt in an empty cache: {rebuild.describe()}")
    if rebuild.identical:
        return 0
    task = workbench.task(spec, CALIBRATION_SOURCE)
    items, limit = workbench.items(spec, task.name), workbench.limits(spec).get(task.name)
    _, tokenizer = workbench.baseline(spec)
    figures = []
    for label, quantized in (("cached build", workbench.quantized(spec, quant_name, config)), ("rebuild", second)):
        with dequantized_weights(quantized.model):
            perplexity = evaluate(quantized.model, tokenizer, task, items, range(limit)).metrics["perplexity"]
        figures.append(f"{label} {perplexity:.2f}")
    print(f"{task.name} perplexity on {limit} windows: " + ", ".join(figures))
    return 1


def _init_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("folder", nargs="?", type=Path, default=Path("."),
                         help="the repository to start (default: the working folder)")


def init_command(args: argparse.Namespace) -> int:
    for path in init_project(args.folder):
        print(f"wrote {path}")
    print("next: pytest --co -q (the matrix's cases), then pytest -m 'not slow' --record-baselines once, and commit "
          "baselines/ after reviewing it")
    return 0


COMMANDS: dict[str, Command] = {
    "init": Command("start a repository: quant.yaml, [tool.quant] in pyproject.toml and a GPU workflow (overwrites "
                    "nothing)", _init_arguments, init_command),
    "report": Command("evaluate the matrix and write the report", _report_arguments, report_command),
    "quantize": Command("quantize one model with one matrix config and print its log", _quantize_arguments,
                        quantize_command),
    "replica": Command("save a random-weight replica of a study model (no download)", _replica_arguments,
                       save_replica_command),
    "show": Command("print one case as it runs: defaults, case entry, quant config, task and profile resolved",
                    _show_arguments, show_command),
    "noise": Command("rerun cases under changes that must not change quality (threads, CPU code path, batch) and "
                     "derive snapshot tolerances from what moved", _noise_arguments, noise_command),
    "history": Command("plot saved benchmark runs (.benchmarks/) to a PNG", _history_arguments, history_command),
    "bench-compare": Command("the newest saved benchmark run against the one before it: a regression only when the "
                             "time ratio's interval lies beyond the threshold", _bench_compare_arguments,
                             bench_compare_command),
    "crosscheck": Command("score the same items with lm-evaluation-harness and compare item by item",
                          _crosscheck_arguments, crosscheck_command),
    "perf": Command("time a model's baseline and quant configs side by side: decode eager and compiled, against "
                    "this machine's memory roofline", _perf_arguments, perf_command),
    "sensitivity": Command("quantize one linear at a time (RTN) and rank them by the KL divergence each causes; a "
                           "heatmap and a mixed-precision config", _sensitivity_arguments, sensitivity_command),
    "check": Command("judge a quantized checkpoint (GPTQ, AWQ, compressed-tensors folder) against its base model on "
                     "the matrix's tasks and gates", _check_arguments, check_command),
    "pareto": Command("the Pareto frontier of a written report: quality against size and speed", _pareto_arguments,
                      decide_command),
    "recommend": Command("the config to ship under constraints, from a written report", _recommend_arguments,
                         decide_command),
    "correlate": Command("does perplexity (or KLD) predict the task scores of a report?", _report_reader_arguments,
                         correlate_command),
}

if __name__ == "__main__":
    sys.exit(main())
