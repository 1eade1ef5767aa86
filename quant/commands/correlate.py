"""``quant correlate``: does perplexity (or KLD) predict the task scores of a written report?"""
from __future__ import annotations

import argparse

from quant.commands.options import add_report_reader

HELP = "does perplexity (or KLD) predict the task scores of a report?"


def arguments(command: argparse.ArgumentParser) -> None:
    add_report_reader(command)


def run(args: argparse.Namespace) -> int:
    from quant.decide import correlations, load_report

    table = correlations(load_report(args.report), args.model)
    print(f"{args.model}: Spearman's rho across quant configs, task retention against the WikiText perplexity ratio "
          "and mean KLD (this model and data only; p: permutation test of no association)")
    for row in table:
        if "rho" in row:
            print(f"  {row['task']} vs {row['predictor']}: rho {row['rho']:+.3f}, n {row['n']}, p {row['p']:.3f}")
        else:
            print(f"  {row['task']}" + (f" vs {row['predictor']}" if "predictor" in row else "") + f": {row['note']}")
    return 0
