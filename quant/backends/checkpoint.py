"""A quantized checkpoint folder, whoever made it: its format detected from its files, checked before loading
(missing files or tensors, NaN or zero scales), and loaded on the kernel the format's package picks. Library
backends save such folders; ``quant check`` judges one someone hands over."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quant.config import UserError
from quant.backends.base import BackendUnavailable, kernel_names, packed_layers, records_from_model
from quant.methods.base import replace_module
from quant.qlinear import QuantLinear

log = logging.getLogger("quant")

# format -> (tensors every quantized module must have, the pip command of the package that loads it)
FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "gptq": (("qweight", "qzeros", "scales"), 'pip install -e ".[gptqmodel]"'),
    "awq": (("qweight", "qzeros", "scales"), 'pip install -e ".[gptqmodel]"'),
    "compressed-tensors": (("weight_packed", "weight_scale"), "pip install compressed-tensors==0.20.0"),
}
SCALES = ("scales", "weight_scale")
CPU_WORKERS_ENV = "GPTQMODEL_CPU_WORKERS"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be judged; the message names the file and what to fix or install."""


@torch.no_grad()  # the packed buffers must be plain tensors (a copy that autograd records cannot be deep-copied)
def repack_compressed_tensors(model: nn.Module, folder: Path) -> nn.Module:
    """Every compressed-tensors pack-quantized layer onto the suite's QuantLinear: the same integer codes, the
    scales rounded to fp16 (QuantLinear's format; relative change <= 2**-11). compressed-tensors has no packed
    CPU path: transformers decompresses the whole model to float on its first forward (measured: 173 MB as
    loaded, 545 MB after one forward), so as loaded it would be run, sized and timed as a float model."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for name, module in list(packed_layers(model)):
        weights = module.quantization_scheme.weights
        if weights.type != "int" or not weights.symmetric or hasattr(module, "weight_g_idx"):
            raise CheckpointError(f"{folder}: layer {name} is {weights.type} {'sym' if weights.symmetric else 'asym'}"
                                  f"{' with activation-ordered groups (g_idx)' if hasattr(module, 'weight_g_idx') else ''}"
                                  "; only symmetric integer groups in their own order run packed here")
        shape = torch.Size(module.weight_shape.tolist())
        offset = 2 ** (weights.num_bits - 1)  # signed codes -> the unsigned grid QuantLinear keeps, zero in the middle
        codes = unpack_from_int32(module.weight_packed, weights.num_bits, shape).int() + offset
        scales = module.weight_scale.reshape(shape[0], -1)
        layer = QuantLinear.from_quantized(codes, scales, torch.zeros_like(scales), weights.num_bits,
                                           shape[1] // scales.shape[1], sym=True, bias=module.bias)
        replace_module(model, name, layer)
    return model


def quantization_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's quantization settings: config.json's ``quantization_config``, else quantize_config.json."""
    config_file = folder / "config.json"
    if any(folder.glob("*.gguf")):
        raise CheckpointError(f"{folder}: a GGUF file, which is not a checkpoint format `check` reads (transformers "
                              "would dequantize it to float on load). It reads a transformers folder (config.json and "
                              "*.safetensors) quantized as " + ", ".join(FORMATS) + "; llama.cpp's own tools judge "
                              "a GGUF")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a transformers checkpoint folder has a config.json)")
    config = _json_file(config_file)
    if "quantization_config" in config:
        return config["quantization_config"]
    for name in ("quantize_config.json", "quant_config.json"):
        if (folder / name).is_file():
            return _json_file(folder / name)
    raise CheckpointError(f"{config_file}: no quantization_config (and no quantize_config.json): this folder "
                          "holds an unquantized model")


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); re-export the checkpoint") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: a JSON object was expected, not {type(value).__name__}")
    return value


def detect_format(folder: Path) -> str:
    settings = quantization_config(folder)
    method = str(settings.get("quant_method", settings.get("method", ""))).lower()
    if method not in FORMATS:
        raise CheckpointError(f"{folder}: quantization method {method!r} is not one this suite loads "
                              f"({', '.join(FORMATS)})")
    return method


def validate(folder: Path, fmt: str) -> None:
    """Every quantized module has the tensors its format needs, and every scale is finite and non-zero: a
    checkpoint that fails here would otherwise crash mid-report or be silently run as something else."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights file")
    needed, _ = FORMATS[fmt]
    present: dict[str, set[str]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                module, _, tensor = key.rpartition(".")
                present.setdefault(module, set()).add(tensor)
                if tensor in SCALES:
                    scale = handle.get_tensor(key).float()
                    bad = (~torch.isfinite(scale)).sum().item() or (scale == 0).sum().item()
                    if bad:
                        raise CheckpointError(f"{path}: tensor {key} has {bad} NaN, infinite or zero scale(s); "
                                              "re-export the checkpoint")
    quantized = {module: tensors for module, tensors in present.items() if tensors & set(needed)}
    if not quantized:
        raise CheckpointError(f"{folder}: no tensors of a {fmt} quantized layer ({', '.join(needed)})")
    for module, tensors in sorted(quantized.items()):
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise CheckpointError(f"{folder}: layer {module} lacks {', '.join(missing)} (a {fmt} layer has "
                                  f"{', '.join(needed)}); the checkpoint is incomplete")


def import_gptqmodel() -> Any:
    """The gptqmodel module, imported without letting it reconfigure this process. Its thread pool asks for 2
    model-loader workers but sizes its CPU pool at half the cores: on a 2-core machine 1, and every load fails
    ("requests 2 workers but parent 'cpu' only has 1"), so the pool gets at least 2 unless GPTQMODEL_CPU_WORKERS
    says otherwise. Its import also points HF_HOME and the hub cache at /tmp (through tokenicer), sets allocator
    and inductor variables and a root log handler: all of that is put back as it was."""
    if "gptqmodel" in sys.modules:
        return sys.modules["gptqmodel"]
    os.environ.setdefault(CPU_WORKERS_ENV, str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    environ, root = dict(os.environ), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import gptqmodel
    finally:
        os.environ.clear()
        os.environ.update(environ)
        root.handlers[:] = handlers
        root.setLevel(level)
    return gptqmodel


def load_checkpoint(folder: Path, device: str) -> tuple[nn.Module, str]:
    """(model in eval mode, the kernel its quantized layers run on) after ``validate``. Refuses a model that
    loaded without any packed layer: it was dequantized on the way, and its bytes and speed would be a float
    model's."""
    fmt = detect_format(folder)
    validate(folder, fmt)
    log.info("loading the %s checkpoint %s", fmt, folder)
    _, install = FORMATS[fmt]
    try:
        if fmt in ("gptq", "awq"):
            model = import_gptqmodel().GPTQModel.load(str(folder), device=device).model
        else:
            from transformers import AutoModelForCausalLM

            model = repack_compressed_tensors(AutoModelForCausalLM.from_pretrained(str(folder)).to(device), folder)
    except ImportError as error:
        raise BackendUnavailable(f"{folder}: a {fmt} checkpoint needs a package that is missing ({error}): "
                                 f"run `{install}`") from None
    model.eval()
    with torch.no_grad():  # kernels convert some tensors on their first forward (GPTQModel's TorchAtenLinear unpacks
        model(torch.zeros(1, 1, dtype=torch.long, device=device))  # its zero points to bf16): bytes as served
    kernel = kernel_names(model) + (", compressed-tensors codes repacked" if fmt == "compressed-tensors" else "")
    if not records_from_model(model):
        raise CheckpointError(f"{folder}: no packed layer left after loading and one forward (dequantized to float "
                              f"on the way); install what runs {fmt} layers packed: `{install}`")
    return model, kernel

