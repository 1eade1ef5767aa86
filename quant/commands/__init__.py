"""The ``quant`` commands, one module each: its help line (``HELP``), its arguments (``arguments(parser)``) and its
handler (``run(args)``, returning the exit status). A module imports at its top only what its arguments need; the
handler imports the library it runs, so ``quant --help`` and a command's parsing load neither torch nor
transformers."""
from __future__ import annotations

# the commands in the order ``quant --help`` lists them: name -> module under quant.commands
COMMANDS = {
    "init": "init", "report": "report", "quantize": "quantize", "replica": "replica", "show": "show",
    "noise": "noise", "history": "history", "bench-compare": "bench_compare", "crosscheck": "crosscheck",
    "perf": "perf", "sensitivity": "sensitivity", "check": "check", "pareto": "pareto", "recommend": "recommend",
    "correlate": "correlate",
}
