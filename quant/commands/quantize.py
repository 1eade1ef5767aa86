"""``quant quantize MODEL QUANT``: build (or load from the cache) one quantized model and print its log."""
from __future__ import annotations

import argparse
import dataclasses

from quant.commands.options import add_inputs
from quant.config import CALIB_DTYPES

HELP = "quantize one model with one matrix config and print its log"


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a model name from matrix.yaml")
    command.add_argument("quant", help="a quant config name from matrix.yaml, e.g. gptq-w4g128")
    add_inputs(command, reports=False)
    command.add_argument("--profile", default="report", help="profile whose calibration count applies")
    command.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the profile's)")
    command.add_argument("--calib-dtype", choices=CALIB_DTYPES, default=None,
                         help="GPTQ: dtype of the calibration forward's matmuls (default: the config's, float32)")
    command.add_argument("--calib-chunk", type=int, default=None,
                         help="calibration samples per forward of a block, to bound peak memory (default: all at once)")
    command.add_argument("--reproducible", action="store_true",
                         help="build it again in an empty cache and compare every tensor; when they differ, the "
                              "WikiText perplexity of both builds on the profile's windows")


def run(args: argparse.Namespace) -> int:
    from quant.config import data_dir
    from quant.matrix import load_matrix
    from quant.pipeline import CALIBRATION_SOURCE, Workbench
    from quant.snapshots import local_device

    matrix = load_matrix(args.matrix)
    matrix.check_names(args.model, [args.quant])
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), local_device(), args.calib_samples)
    spec = matrix.models[args.model]
    config = matrix.quant[args.quant]
    if args.calib_dtype:
        config = dataclasses.replace(config, calib_dtype=args.calib_dtype)
    if args.calib_chunk:
        config = dataclasses.replace(config, calib_chunk=args.calib_chunk)
    built = workbench.quantized(spec, args.quant, config)
    counts = built.layer_counts()
    if built.quantize_seconds is None:
        print(f"{args.model} {args.quant}: a checkpoint, loaded with {counts['quantized_layers']} packed layers on "
              f"{built.kernel}")
        return 0
    peak = ("" if built.quantize_peak_bytes is None
            else f", peak {built.quantize_peak_bytes / 1e6:.0f} MB above what was loaded")
    print(f"{args.model} {args.quant}: {counts['quantized_layers']} layers quantized in {built.quantize_seconds:.1f} s"
          f"{peak} (recorded when built, saving included; a cached model prints the original figures)")
    print(f"runs on: {built.kernel}")
    print(f"calibration: {built.calibration or 'none'}")
    split = None if config.backend else built.time_split()  # a library does not log where its time went
    if split:
        print(f"time: Hessians {split[0]:.1f} s, per-layer quantization and packing {split[1]:.1f} s, the rest "
              f"(running the blocks over the calibration set) {split[2]:.1f} s")
    print(f"group-size fallbacks: {counts['fallback_layers']} layers")
    errors = [r.output_error for r in built.records if r.output_error is not None]
    if errors:
        print(f"mean relative output error on the calibration inputs: {sum(errors) / len(errors):.4f}")
    if not args.reproducible:
        return 0
    rebuild, perplexities = workbench.rebuilt(spec, args.quant, config)
    print(f"rebuilt in an empty cache: {rebuild.describe()}")
    if perplexities:
        limit = workbench.limits(spec).get(CALIBRATION_SOURCE)
        print(f"{CALIBRATION_SOURCE} perplexity on {limit} windows: "
              + ", ".join(f"{label} {value:.2f}" for label, value in perplexities.items()))
    return 0 if rebuild.identical else 1
