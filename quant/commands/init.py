"""``quant init [folder]``: start a repository (quant.yaml, [tool.quant] in pyproject.toml, a GPU workflow)."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "start a repository: quant.yaml, [tool.quant] in pyproject.toml and a GPU workflow (overwrites nothing)"


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("folder", nargs="?", type=Path, default=Path("."),
                         help="the repository to start (default: the working folder)")


def run(args: argparse.Namespace) -> int:
    from quant.scaffold import init_project

    for path in init_project(args.folder):
        print(f"wrote {path}")
    print("next: pytest --co -q (the matrix's cases), then pytest -m 'not slow' --record-baselines once, and commit "
          "baselines/ after reviewing it")
    return 0
