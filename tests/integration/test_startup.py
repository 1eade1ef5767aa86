"""What starting the command line or the plugin loads, in a fresh interpreter each."""
from __future__ import annotations
import subprocess
import sys
import pytest


# What starting the command line or the plugin may load: neither the compiler, the model library, nor (for the
# command line) torch itself. A command imports what it runs when it runs.
HEAVY = ("torch", "transformers", "torch._dynamo", "torch._inductor", "matplotlib", "lm_eval", "datasets")


LIGHT_STARTS = {"quant.cli": HEAVY, "quant.pytest_plugin": HEAVY,
                "quant.matrix": ("transformers", "torch._dynamo", "torch._inductor", "matplotlib", "lm_eval")}


@pytest.mark.parametrize("module", sorted(LIGHT_STARTS))
def test_starting_imports_no_heavy_module(module):
    """In a fresh interpreter: this process has loaded them all already."""
    code = f"import sys, {module}; print(' '.join(m for m in {LIGHT_STARTS[module]!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"import {module} loads {loaded}"


def test_every_command_parses_without_the_library():
    """``quant <command> --help`` for each command, in one fresh interpreter: no heavy module loaded."""
    code = ("import sys, contextlib, io\nfrom quant.cli import build_parser\nfrom quant.commands import COMMANDS\n"
            "for name in COMMANDS:\n    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        build_parser().parse_args([name, '--help'])\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
