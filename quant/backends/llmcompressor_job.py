"""Run inside llm-compressor's own virtual environment (its pins differ from the suite's: make llmcompressor-env),
as a script, never imported by the suite: GPTQ of a saved baseline folder on the calibration token ids the
suite hands over, saved as a compressed-tensors checkpoint.

    python llmcompressor_job.py SOURCE CALIBRATION.safetensors OUT SETTINGS_JSON
"""
import json
import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(source: str, calibration: str, out: str, settings: str) -> None:
    settings = json.loads(settings)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = load_file(calibration)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": settings["bits"], "type": "int", "symmetric": settings["sym"],
               "strategy": "group" if settings["group_size"] else "channel", "group_size": settings["group_size"],
               "actorder": "static" if settings["act_order"] else None}
    recipe = GPTQModifier(ignore=["lm_head"], dampening_frac=settings["damp_percent"],
                          config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
