"""``quant check --base MODEL --candidate FOLDER``: judge a quantized checkpoint against its base model on the
matrix's tasks and gates."""
from __future__ import annotations

import argparse
from pathlib import Path

from quant.commands.options import add_inputs

HELP = ("judge a quantized checkpoint (GPTQ, AWQ, compressed-tensors folder) against its base model on the matrix's "
        "tasks and gates")


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--base", required=True, help="the matrix model it was quantized from, e.g. smollm2-135m")
    command.add_argument("--candidate", type=Path, required=True, help="the checkpoint folder")
    command.add_argument("--tasks", default=None,
                         help="comma-separated tasks (default: every task the matrix runs on the base model)")
    command.add_argument("--like", default=None,
                         help="gate as the matrix gates this quant config's cases (default: the base model's first "
                              "case of each task)")
    command.add_argument("--profile", default="report", help="item counts from matrix.yaml profiles (report, test)")
    add_inputs(command)


def run(args: argparse.Namespace) -> int:
    from quant import report
    from quant.config import ConfigError, data_dir
    from quant.matrix import load_matrix
    from quant.pipeline import Workbench
    from quant.snapshots import local_device

    if not args.candidate.is_dir():
        raise ConfigError(f"--candidate {args.candidate}: not a folder")
    tasks = args.tasks.split(",") if args.tasks else None
    matrix, cases = load_matrix(args.matrix).with_checkpoint(args.base, args.candidate, tasks, args.like)
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), local_device())
    workbench.quantized(cases[0].model, cases[0].quant_name, cases[0].quant)  # a broken checkpoint stops here
    result = report.build(workbench, cases, [], args.command_line)
    json_path, md_path = report.write(result, args.out / cases[0].quant_name)
    print("\n".join(report.headline(result)))
    print(f"\nwrote {md_path} and {json_path}")
    return 1 if any(row.get("verdict") == "fail" for row in result["rows"]) else 0
