"""``quant report``: evaluate the matrix's cases of one tier and write the report (``--dry-run``: the plan)."""
from __future__ import annotations

import argparse

from quant.commands.options import add_inputs

HELP = "evaluate the matrix and write the report"


def arguments(command: argparse.ArgumentParser) -> None:
    add_inputs(command)
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


def run(args: argparse.Namespace) -> int:
    from quant import plan, report
    from quant.compiled import use_compile_cache
    from quant.config import data_dir
    from quant.matrix import load_matrix
    from quant.pipeline import Workbench
    from quant.project import current
    from quant.snapshots import check_hardware, hardware_class, local_device

    matrix = load_matrix(args.matrix)
    here = local_device()
    tier = args.tier or ("gpu" if here == "cuda" else "cpu")
    if args.hardware:
        check_hardware(args.hardware, hardware_class("cuda") if here == "cuda" else None)
    cases, skipped = matrix.selection(args.select, tier, args.cadence)
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), here)
    if args.dry_run:
        spreads = plan.cached_spreads(workbench, cases)
        print(plan.describe(matrix, cases, args.profile, tier, current().baselines, args.hardware, spreads))
        return print_inputs(plan.unreachable_inputs(cases, data_dir(args.data_dir)),
                            runs_here=tier == ("gpu" if here == "cuda" else "cpu"))
    use_compile_cache()
    result = report.build(workbench, cases, skipped, args.command_line, args.reproducible)
    json_path, md_path = report.write(result, args.out)
    print("\n".join(report.headline(result)))
    print(f"\nwrote {md_path} and {json_path}")
    return 0


def print_inputs(problems: list[str], runs_here: bool) -> int:
    """Say whether the data and each model's weights are reachable; 2 when something this run needs is not."""
    if not problems:
        print("inputs: the data files and every model's weights are reachable")
        return 0
    where = "" if runs_here else " (on this machine; the runner that runs this tier needs them)"
    print(f"inputs not reachable{where}:\n" + "\n".join(f"  {problem}" for problem in problems))
    return 2 if runs_here else 0
