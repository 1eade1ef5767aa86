"""``quant perf MODEL``: time a model's baseline and quant configs side by side, decode eager and compiled, against
this machine's memory roofline."""
from __future__ import annotations

import argparse
import dataclasses
import json

from quant.commands.options import add_inputs

HELP = ("time a model's baseline and quant configs side by side: decode eager and compiled, against this machine's "
        "memory roofline")


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a model name from matrix.yaml")
    command.add_argument("--quant", action="append", default=None,
                         help="a quant config to time (repeat the flag; default: every config the model's cases use)")
    command.add_argument("--compiled", default="inductor",
                         help="torch.compile backend of the static-cache decode, or 'none' (default: %(default)s)")
    command.add_argument("--cpp-wrapper", action="store_true",
                         help="inductor's C++ wrapper around the compiled step (faster steps, minutes of compiling)")
    command.add_argument("--compiled-prefill", action="store_true",
                         help="compile the prompt's forward too, ahead of time, with frozen weights and autotuned "
                              "GEMM templates (AMX int4/int8 kernels), and time it: the compiled TTFT (minutes of "
                              "compiling per variant the first time; the package is kept in the result cache)")
    command.add_argument("--profile", default="report", help="profile whose perf settings apply")
    add_inputs(command)


def run(args: argparse.Namespace) -> int:
    from quant import report
    from quant.compiled import use_compile_cache
    from quant.config import ConfigError, data_dir
    from quant.matrix import load_matrix
    from quant.perf import memory_bandwidth
    from quant.pipeline import Workbench
    from quant.snapshots import local_device

    if args.cpp_wrapper and args.compiled != "inductor":
        raise ConfigError(f"--cpp-wrapper is inductor's; it cannot go with --compiled {args.compiled}")
    if args.compiled_prefill and args.compiled == "none":
        raise ConfigError("--compiled-prefill compiles with the --compiled backend; it cannot go with --compiled none")
    matrix = load_matrix(args.matrix)
    matrix.check_names(args.model, args.quant or [])
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), local_device())
    spec = matrix.models[args.model]
    variants = [v for v in report.timed_variants([c for c in matrix.cases if c.model is spec])
                if args.quant is None or v[1] is None]
    variants += [(spec, quant_name, None) for quant_name in args.quant or []]
    here = workbench.device_for(spec)
    use_compile_cache()
    profile_settings = workbench.perf_settings(spec)
    settings = dataclasses.replace(profile_settings, compiled=None if args.compiled == "none" else args.compiled,
                                   cpp_wrapper=args.cpp_wrapper or profile_settings.cpp_wrapper,
                                   compiled_prefill=args.compiled_prefill or profile_settings.compiled_prefill)
    bandwidth = memory_bandwidth(here)
    print(f"memory bandwidth of {here}: {bandwidth / 1e9:.1f} GB/s (copy of a 256 MiB buffer, best of 5)",
          flush=True)
    rows = report.performance_rows(workbench, variants, bandwidth, settings)
    machine = report.machine_line(here, bandwidth)
    timed = {"rows": [], "performance": rows, "machine": machine}
    print(f"{args.model}: {machine}\n{report.performance_table(timed)}")
    print("\n".join(f"{key}: {kernel}" for kernel, key in report.kernel_legend(timed).items()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"perf-{args.model}.json"
    path.write_text(json.dumps({"command": args.command_line, **timed}, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0
