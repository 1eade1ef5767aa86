"""llm-compressor (vLLM's quantization library, which adopted AutoAWQ): its pins (transformers <= 5.17,
compressed-tensors 0.19) cannot share the suite's environment, so it runs in its own virtual environment
(``make llmcompressor-env``) as a subprocess fed the suite's baseline folder and calibration token ids. Its
compressed-tensors checkpoint is loaded and evaluated here (compressed-tensors 0.20 reads it)."""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quant.backends.base import Backend, BackendUnavailable, records_from_model, save_plain
from quant.backends.checkpoint import load_checkpoint
from quant.config import QuantConfig
from quant.methods import LayerRecord

log = logging.getLogger("quant")

# llm-compressor's own environment (its pins cannot share the suite's): $QUANT_LLMCOMPRESSOR_VENV, else
# .venv-llmcompressor in the folder quant runs in (where `make llmcompressor-env` makes it).
VENV_ENV = "QUANT_LLMCOMPRESSOR_VENV"
JOB = Path(__file__).with_name("llmcompressor_job.py")


def venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or Path.cwd() / ".venv-llmcompressor").resolve()


class LLMCompressorBackend(Backend):
    name = "llmcompressor"
    methods = ("gptq",)
    install = "make llmcompressor-env"
    runs_in_process = False
    deterministic = False  # two CPU builds from the same inputs differed in 205 of 692 tensors (docs/measurements.md)

    def code(self, config: QuantConfig) -> tuple[str, ...]:
        return (*super().code(config), f"{__package__}.{JOB.stem}")  # run in its own environment, not imported

    def version(self) -> str:
        return venv_version(venv(), self.install)

    def quantize(self, baseline: nn.Module, tokenizer: Any, config: QuantConfig, calibration: torch.Tensor | None,
                 folder: Path) -> list[LayerRecord]:
        source = folder / "source"
        save_plain(baseline, tokenizer, source)
        save_file({"input_ids": calibration.contiguous()}, str(folder / "calibration.safetensors"))
        settings = {"bits": config.bits, "group_size": config.group_size, "sym": config.sym,
                    "act_order": config.act_order, "damp_percent": config.damp_percent}
        # -P: the script's own folder stays off sys.path, or `import llmcompressor` would find this module
        command = [str(venv() / "bin" / "python"), "-P", str(JOB), str(source), str(folder / "calibration.safetensors"),
                   str(folder), json.dumps(settings)]
        log.info("running llm-compressor %s in %s", self.version(), venv())
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"llm-compressor failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        shutil.rmtree(source)
        (folder / "calibration.safetensors").unlink()
        model, _ = load_checkpoint(folder, "cpu")
        return records_from_model(model)

    def load(self, baseline: nn.Module, folder: Path, records: list[LayerRecord], device: str
             ) -> tuple[nn.Module, str]:
        model, kernel = load_checkpoint(folder, device)
        return model, f"compressed-tensors (llm-compressor {self.version()}): {kernel}"


@functools.lru_cache(maxsize=None)
def venv_version(venv: Path, install: str) -> str:
    """llmcompressor's version in its environment (asked once per process: every cache key holds it)."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise BackendUnavailable(f"backend 'llmcompressor' runs in its own environment {venv}: run `{install}`")
    found = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
                           capture_output=True, text=True)
    if found.returncode:
        raise BackendUnavailable(f"{venv}: llmcompressor is not installed there ({found.stderr.strip()[-200:]}): "
                                 f"run `{install}`")
    return found.stdout.strip()
