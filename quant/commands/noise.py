"""``quant noise [CASE ...]``: every case rerun under changes that must not change quality (one thread, the AVX2
code path, doubled batches), and the snapshot tolerances that cover what moved."""
from __future__ import annotations

import argparse
import json
import time

from quant.commands.options import add_inputs

HELP = ("rerun cases under changes that must not change quality (threads, CPU code path, batch) and derive "
        "snapshot tolerances from what moved")


def arguments(command: argparse.ArgumentParser) -> None:
    add_inputs(command)
    command.add_argument("cases", nargs="*", help="case ids (default: the default cadence's CPU-tier cases)")
    command.add_argument("--profile", default="test", help="the profile whose snapshots are measured (default: "
                                                           "%(default)s, what pytest compares)")
    command.add_argument("--write", action="store_true", help="replace matrix.yaml's measured_tolerances section")


def run(args: argparse.Namespace) -> int:
    from quant import noise
    from quant.config import data_dir
    from quant.matrix import load_matrix
    from quant.project import cache_dir, current

    matrix = load_matrix(args.matrix)
    cases = noise.cases_named(matrix, args.cases)
    started = time.strftime("%Y-%m-%d")
    reference, runs = noise.measure(matrix, args.profile, cases, data_dir(args.data_dir), cache_dir() / "noise",
                                   current().baselines)
    found = noise.deviations(reference, runs)
    tolerances = noise.measured_tolerances(cases, reference, found)
    print(noise.table(cases, found, tolerances))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise.json").write_text(json.dumps({"unchanged": reference, **runs}, indent=1) + "\n")
    print(f"wrote every run's values to {args.out / 'noise.json'}")
    if args.write:
        source = f"python -m quant noise --profile {args.profile} --write, {started}, {noise.this_machine()}"
        noise.write_section(matrix.path, noise.section_text(tolerances, source))
        print(f"wrote {len(tolerances)} cases' measured tolerances to {matrix.path}")
    return 0
