"""``quant recommend``: the config to ship under constraints, from a written report (exit 1: none qualifies)."""
from __future__ import annotations

import argparse

from quant.commands.options import add_report_reader
from quant.decide import AVERAGE

HELP = "the config to ship under constraints, from a written report"


def arguments(command: argparse.ArgumentParser) -> None:
    add_report_reader(command)
    command.add_argument("--task", default=AVERAGE,
                         help=f"a task's retention, or {AVERAGE!r} (the mean over the model's informative tasks)")
    command.add_argument("--max-memory", default=None, help="largest model size, e.g. 150MB")
    command.add_argument("--min-retention", type=float, default=None,
                         help="smallest retention lower bound (95%% CI) on --task")
    command.add_argument("--min-decode-speedup", type=float, default=None, help="e.g. 2 for twice the baseline")


def run(args: argparse.Namespace) -> int:
    from quant.decide import load_report, parse_size, points, recommend

    candidates, _ = points(load_report(args.report), args.model)
    max_bytes = parse_size(args.max_memory) if args.max_memory else None
    advice = recommend(candidates, args.task, max_bytes, args.min_retention, args.min_decode_speedup)
    print("\n".join(advice.lines(args.task)))
    return 0 if advice.chosen else 1
