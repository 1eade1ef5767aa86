"""``quant bench-compare``: the newest saved benchmark run against the one before it; exit 1 on a regression."""
from __future__ import annotations

import argparse

from quant.commands.options import add_benchmark_storage

HELP = ("the newest saved benchmark run against the one before it: a regression only when the time ratio's "
        "interval lies beyond the threshold")


def arguments(command: argparse.ArgumentParser) -> None:
    add_benchmark_storage(command)
    command.add_argument("--threshold", type=float, default=0.40,
                         help="a regression is a time ratio whose whole interval lies above 1 + this (default: "
                              "%(default)s)")


def run(args: argparse.Namespace) -> int:
    from quant.config import ConfigError
    from quant.history import compare_runs, load_runs

    runs = load_runs(args.storage)
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
