"""GPTQModel (ModelCloud; the successor of AutoGPTQ, and what transformers 5 loads GPTQ and AWQ checkpoints
through): GPTQ and AWQ from the suite's own baseline weights and calibration windows, saved as a GPTQ / AWQ
checkpoint and reloaded through GPTQModel's loader on the kernel it picks."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.backends.base import Backend, BackendUnavailable, records_from_model, save_plain
from quant.backends.checkpoint import import_gptqmodel, load_checkpoint
from quant.config import QuantConfig
from quant.methods import LayerRecord


class GPTQModelBackend(Backend):
    name = "gptqmodel"
    methods = ("gptq", "awq")
    distribution = "gptqmodel"
    install = 'pip install -e ".[gptqmodel]"'

    def quantize(self, baseline: nn.Module, tokenizer: Any, config: QuantConfig, calibration: torch.Tensor | None,
                 folder: Path) -> list[LayerRecord]:
        try:
            gptqmodel = import_gptqmodel()
        except ImportError as error:
            raise BackendUnavailable(f"backend 'gptqmodel' does not import ({error}): run `{self.install}`") from None
        folder = folder.resolve()  # absolute: the work below runs inside it
        source = folder / "source"  # GPTQModel quantizes from a folder: the baseline as transformers saves it
        save_plain(baseline, tokenizer, source)
        settings = gptqmodel.QuantizeConfig(method=config.method, bits=config.bits, group_size=config.group_size or -1,
                                  sym=config.sym, desc_act=config.act_order, damp_percent=config.damp_percent)
        # GPTQModel writes its per-layer log under ./logs: inside the checkpoint folder, not wherever this runs
        device = next(baseline.parameters()).device
        # AWQ's automatic choice is its CUDA GEMM kernel whatever the device; on the CPU name the torch one
        packer = "awq_torch" if config.method == "awq" and device.type == "cpu" else "auto"
        with contextlib.chdir(folder):
            model = gptqmodel.GPTQModel.load(str(source), settings, device=str(device))
            model.quantize([{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]}
                            for row in calibration], backend=packer)
            model.save(str(folder))
        shutil.rmtree(source)
        return records_from_model(model.model)

    def load(self, baseline: nn.Module, folder: Path, records: list[LayerRecord], device: str
             ) -> tuple[nn.Module, str]:
        model, kernel = load_checkpoint(folder, device)
        return model, f"gptqmodel {self.version()}: {kernel}"

