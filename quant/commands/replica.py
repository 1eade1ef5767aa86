"""``quant replica MODEL``: save a random-weight replica of one of the reference study's models."""
from __future__ import annotations

import argparse
from pathlib import Path

from quant.commands.options import add_matrix

HELP = "save a random-weight replica of a study model (no download)"


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="a study model: llama-3.2-1b, qwen2.5-0.5b or phi-1.5 (quant.replicas)")
    command.add_argument("--tokenizer", required=True,
                         help="a tokenizer folder, or a matrix model whose tokenizer is local (e.g. smollm2-135m)")
    command.add_argument("--out", type=Path, required=True,
                         help="the folder to write (load it with QUANT_MODEL_<NAME>)")
    command.add_argument("--small", action="store_true", help="two narrow blocks instead of the published size")
    add_matrix(command)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from quant.config import ConfigError
    from quant.matrix import load_matrix
    from quant.models import DTYPES
    from quant.replicas import REPLICAS, save_replica

    if args.model not in REPLICAS:
        raise ConfigError(f"no replica of {args.model!r}; known: {sorted(REPLICAS)}")
    models = load_matrix(args.matrix).models
    if args.tokenizer in models:
        location, gguf_file = models[args.tokenizer].source()
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    spec = models.get(args.model)
    dtype = DTYPES[spec.dtype] if spec else torch.float32
    folder = save_replica(args.model, tokenizer, args.out, small=args.small, dtype=dtype)
    env = spec.override_env if spec else "QUANT_MODEL_<NAME>"
    print(f"wrote {folder} ({'small' if args.small else 'full-size'} {args.model}, vocabulary {len(tokenizer)}); "
          f"use it with {env}={folder}")
    return 0
