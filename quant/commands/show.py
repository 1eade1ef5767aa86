"""``quant show CASE``: one case as the suite runs it, resolved from the matrix's defaults, the case entry, its quant
config, its task and the profile: the single declarative record of the case."""
from __future__ import annotations

import argparse

import yaml

from quant.commands.options import add_matrix

HELP = "print one case as it runs: defaults, case entry, quant config, task and profile resolved"


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("case", help="a case id, e.g. smollm2-135m-rtn-w4g128-wikitext")
    command.add_argument("--profile", default="test", help="the profile whose item counts and options apply "
                                                           "(default: %(default)s, what pytest runs)")
    add_matrix(command)


def run(args: argparse.Namespace) -> int:
    from quant.matrix import load_matrix

    matrix = load_matrix(args.matrix)
    record = matrix.resolved(matrix.case(args.case), args.profile)
    print(yaml.safe_dump(record, sort_keys=False, allow_unicode=True), end="")
    return 0
