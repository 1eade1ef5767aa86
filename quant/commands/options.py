"""Options and helpers several commands share: the matrix, data and output folders, a report to read, the device."""
from __future__ import annotations

import argparse
from pathlib import Path

from quant.project import MATRIX_ENV, current

MATRIX_HELP = f"the matrix file (default: ${MATRIX_ENV}, else [tool.quant] matrix in the project's pyproject.toml)"


def add_matrix(command: argparse.ArgumentParser) -> None:
    command.add_argument("--matrix", type=Path, default=None, help=MATRIX_HELP)


def add_inputs(command: argparse.ArgumentParser, reports: bool = True) -> None:
    """The options of a command that reads the matrix and the evaluation data (and writes under reports/)."""
    add_matrix(command)
    command.add_argument("--data-dir", default=None, help="evaluation data folder (default: $QUANT_DATA_DIR)")
    if reports:
        command.add_argument("--out", type=Path, default=current().reports)


def add_report_reader(command: argparse.ArgumentParser) -> None:
    """The options of a command that reads a written report."""
    command.add_argument("--report", type=Path, default=current().reports / "latest.json",
                         help="a report's JSON (default: %(default)s)")
    command.add_argument("--model", default="smollm2-135m", help="a model of the report")


def add_benchmark_storage(command: argparse.ArgumentParser) -> None:
    command.add_argument("--storage", type=Path, default=current().benchmarks,
                         help="pytest-benchmark storage folder (default: .benchmarks)")

