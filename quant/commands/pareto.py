"""``quant pareto``: the Pareto frontier of a written report, quality against size."""
from __future__ import annotations

import argparse
from pathlib import Path

from quant.commands.options import add_report_reader
from quant.decide import AVERAGE

HELP = "the Pareto frontier of a written report: quality against size and speed"


def arguments(command: argparse.ArgumentParser) -> None:
    add_report_reader(command)
    command.add_argument("--task", default=AVERAGE, help=f"a task's retention, {AVERAGE!r} (the mean over the "
                                                         "model's informative tasks) or 'kld' (mean KLD)")
    command.add_argument("--out", type=Path, default=None, help="the PNG (default: next to the report)")


def run(args: argparse.Namespace) -> int:
    from quant.decide import frontier, load_report, plot_pareto, points

    candidates, baseline = points(load_report(args.report), args.model)
    out = args.out or args.report.parent / f"pareto-{args.model}-{args.task}.png"
    line = frontier(candidates, args.task)
    print(f"Pareto frontier ({args.task} against bytes), smallest first:")
    print("\n".join(f"  {p.quant}: {p.bytes / 1e6:.0f} MB, "
                    + (f"mean KLD {p.mean_kld:.4f}" if args.task == "kld" else
                       f"retention {p.score(args.task)[0]:.3f}") for p in line))
    print(f"wrote {plot_pareto(candidates, baseline, args.task, out)}")
    return 0
