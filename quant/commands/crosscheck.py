"""``quant crosscheck lm-eval --task T``: score the suite's items with lm-evaluation-harness and compare item by item."""
from __future__ import annotations

import argparse
import dataclasses
import json

from quant.commands.options import add_inputs

HELP = "score the same items with lm-evaluation-harness and compare item by item"


def arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("tool", choices=["lm-eval"], help="the reference implementation")
    command.add_argument("--task", required=True, help="a built-in task lm-eval has a counterpart of (boolq, gsm8k)")
    command.add_argument("--limit", type=int, default=None,
                         help="items (the suite's seeded selection; default: the profile's)")
    command.add_argument("--model", default="smollm2-135m", help="a model name from matrix.yaml")
    command.add_argument("--quant", default=None,
                         help="a quant config name: check the quantized model instead of the baseline")
    command.add_argument("--profile", default="report", help="profile whose item count and task options apply")
    command.add_argument("--batch-size", type=int, default=None,
                         help="both evaluators' batch size (default: the task's)")
    add_inputs(command)


def run(args: argparse.Namespace) -> int:
    from quant.config import ConfigError, data_dir
    from quant.crosscheck import LM_EVAL_TASKS, crosscheck
    from quant.data import load
    from quant.kinds.generate import fewshot_exemplars
    from quant.matrix import load_matrix
    from quant.pipeline import Workbench
    from quant.qlinear import dequantized_weights
    from quant.snapshots import local_device
    from quant.tasks import select_items

    if args.task not in LM_EVAL_TASKS:
        raise ConfigError(f"--task {args.task!r}: lm-eval has a counterpart of {', '.join(sorted(LM_EVAL_TASKS))}")
    matrix = load_matrix(args.matrix)
    matrix.check_names(args.model, [args.quant] if args.quant else [])
    folder = data_dir(args.data_dir)
    workbench = Workbench(matrix, args.profile, folder, local_device())
    spec = matrix.models[args.model]
    task = workbench.task(spec, args.task)
    limit = args.limit if args.limit is not None else workbench.limits(spec).get(args.task)
    items = select_items(task, folder, limit, matrix.seed)
    exemplars = fewshot_exemplars(task, load(task.loader, folder))
    model, tokenizer = workbench.baseline(spec)
    if args.quant:
        config = workbench.calibration_config(spec, matrix.quant[args.quant])
        model = workbench.quantized(spec, args.quant, config).model
    with dequantized_weights(model):
        agreement = crosscheck(model, tokenizer, task, items, exemplars, args.batch_size)
    print("\n".join(agreement.lines()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"crosscheck-lm-eval-{args.task}-{args.model}-{args.quant or 'baseline'}.json"
    path.write_text(json.dumps({"command": args.command_line, **dataclasses.asdict(agreement),
                                "agrees": agreement.agrees}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if agreement.agrees else 1
