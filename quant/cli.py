"""Command line: ``quant <command>``, one module per command under ``quant/commands`` (``quant --help`` lists them).
This module gathers them into one parser and prints what a user can fix as one line with exit status 2."""
from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from types import ModuleType

from quant.commands import COMMANDS
from quant.config import UserError


def command_module(name: str) -> ModuleType:
    """The module of the command ``name`` (its HELP, arguments and run)."""
    return importlib.import_module(f"quant.commands.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quant", description="Regression suite for quantized LLMs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = command_module(name)
        module.arguments(subparsers.add_parser(name, help=module.HELP, description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        args = build_parser().parse_args(argv)  # its defaults read the project's pyproject.toml
        args.command_line = "quant " + shlex.join(argv if argv is not None else sys.argv[1:])  # recorded with outputs
        return command_module(args.command).run(args)
    except UserError as error:
        print(f"quant: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
