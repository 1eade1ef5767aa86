"""``quant sensitivity MODEL``: quantize one linear at a time (RTN), rank them by the KL divergence each causes, and
turn the ranking into a heatmap and a mixed-precision config."""
from __future__ import annotations

import argparse
import dataclasses
import json

from quant.commands.options import add_inputs

HELP = ("quantize one linear at a time (RTN) and rank them by the KL divergence each causes; a heatmap and a "
        "mixed-precision config")


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a model name from matrix.yaml")
    command.add_argument("--quant", default="rtn-w4g128",
                         help="an rtn config from matrix.yaml (default: %(default)s)")
    command.add_argument("--windows", type=int, default=None,
                         help="WikiText windows to measure on (default: the profile's wikitext count)")
    command.add_argument("--budget", type=float, default=0.10,
                         help="mixed precision: the most sensitive linears go to 8 bits while the quantized "
                              "linears' bytes grow by at most this share (default: %(default)s)")
    command.add_argument("--profile", default="test", help="profile whose wikitext window count applies")
    add_inputs(command)


def run(args: argparse.Namespace) -> int:
    from quant.config import data_dir
    from quant.matrix import load_matrix
    from quant.pipeline import Workbench
    from quant.sensitivity import heatmap, layer_sensitivity, mixed_precision_overrides
    from quant.snapshots import local_device

    matrix = load_matrix(args.matrix)
    matrix.check_names(args.model, [args.quant])
    workbench = Workbench(matrix, args.profile, data_dir(args.data_dir), local_device())
    spec = matrix.models[args.model]
    windows = args.windows or workbench.limits(spec)["wikitext"]
    ranking = layer_sensitivity(workbench, spec, args.quant, windows)
    config = matrix.quant[args.quant]
    overrides = mixed_precision_overrides(ranking, config, args.budget)
    ranked = sorted(ranking, key=lambda row: row.mean_kld, reverse=True)
    stem = f"sensitivity-{args.model}-{args.quant}"  # (not Path.with_suffix: model names hold dots)
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    title = (f"{args.model}: mean KLD with one linear quantized alone ({config.label}, RTN), "
             f"{windows} WikiText windows")
    picture = heatmap(ranking, title, png_path)
    json_path.write_text(json.dumps({
        "command": args.command_line, "windows": windows, "quant": config.to_dict(),
        "ranking": [dataclasses.asdict(row) for row in ranked], "mixed_precision_overrides": overrides}, indent=1) + "\n")
    print(f"{title}; most sensitive first:")
    print("\n".join(f"  {row.mean_kld:.5f}  same top {row.same_top_p:.3f}  {row.name}" for row in ranked[:10]))
    print(f"  ... {len(ranked) - 10} more in {json_path}" if len(ranked) > 10 else "")
    print(f"mixed precision within +{args.budget:.0%} of the quantized linears' bytes: {len(overrides)} linears at "
          f"8 bits per channel; as a matrix.yaml quant entry:")
    print(f"  {args.quant}-mixed: " + json.dumps({**{k: v for k, v in config.to_dict().items()
                                                     if k in ("method", "bits", "group_size", "sym")},
                                                  "layer_overrides": overrides}))
    print(f"wrote {picture} and {json_path}")
    return 0
