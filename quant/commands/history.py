"""``quant history``: plot the saved benchmark runs (.benchmarks/) to a PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from quant.commands.options import add_benchmark_storage
from quant.project import current

HELP = "plot saved benchmark runs (.benchmarks/) to a PNG"


def arguments(command: argparse.ArgumentParser) -> None:
    add_benchmark_storage(command)
    command.add_argument("--out", type=Path, default=current().reports / "history.png")


def run(args: argparse.Namespace) -> int:
    from quant.history import plot

    print(f"wrote {plot(args.storage, args.out)}")
    return 0
