"""One interface for "a quantized model": a backend turns a baseline, a quant config and calibration token ids
into a checkpoint folder, and loads such a folder back as a model to evaluate. The in-house methods are one
backend among others; a checkpoint someone hands over is a candidate with no build step."""
from __future__ import annotations

import abc
import copy
import dataclasses
import importlib.metadata
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from quant.config import ConfigError, QuantConfig, UserError
from quant.memory import PeakAboveHeld
from quant.methods import LayerRecord


class BackendUnavailable(UserError, RuntimeError):
    """A backend's package is not installed (or does not import) here; the message says what to install."""


class Backend(abc.ABC):
    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]  # the quant config's ``method`` values this backend implements
    distribution: ClassVar[str | None] = None  # the pip distribution whose version enters the cache key
    install: ClassVar[str] = ""
    # whether quantize() runs in this process, so that its peak memory is this process's (llm-compressor runs in a
    # subprocess of its own environment: not measured here)
    runs_in_process: ClassVar[bool] = True
    # whether two builds from the same inputs come out bit-identical (``quant quantize --reproducible`` checks it);
    # the backend contract test holds every backend that claims it to it
    deterministic: ClassVar[bool] = True

    def check(self, config: QuantConfig, where: str) -> None:
        """Refuse, naming the field, a config this backend cannot build."""
        if config.method not in self.methods:
            raise ConfigError(f"{where}: unknown method {config.method!r}; known: {sorted(self.methods)} "
                              f"(backend {self.name!r})")

    def version(self) -> str:
        """The installed version of the backend's package, or BackendUnavailable with the install command."""
        if self.distribution is None:
            return "in-house"
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise BackendUnavailable(f"backend {self.name!r} needs {self.distribution}: run `{self.install}`") from None

    def code(self, config: QuantConfig) -> tuple[str, ...]:
        """The modules whose code builds ``config`` with this backend (its cache key holds them and what they
        import): the backend's own module, and any code it runs that it does not import."""
        return (type(self).__module__,)

    def identity(self) -> dict[str, str]:
        """What a cache key holds of the backend: its name and version (a new release rebuilds every model)."""
        return {"backend": self.name, "version": self.version()}

    def needs_calibration(self, config: QuantConfig) -> bool:
        return True

    @abc.abstractmethod
    def quantize(self, baseline: nn.Module, tokenizer: Any, config: QuantConfig, calibration: torch.Tensor | None,
                 folder: Path) -> list[LayerRecord]:
        """Quantize a copy of ``baseline`` and save it in ``folder``; the baseline itself is left unchanged."""

    @abc.abstractmethod
    def load(self, baseline: nn.Module, folder: Path, records: list[LayerRecord], device: str
             ) -> tuple[nn.Module, str]:
        """The saved model, on ``device`` in eval mode, and the kernel its quantized layers run on."""


BUILD_LOG = "quantization_log.json"  # a built folder's per-layer records, build time and peak memory


def build(backend: Backend, baseline: nn.Module, tokenizer: Any, config: QuantConfig,
          calibration: torch.Tensor | None, folder: Path, device: str) -> None:
    """Quantize with ``backend`` into ``folder``, and log beside the weights what ``read_build`` gives back."""
    above_held = PeakAboveHeld(device)
    started = time.perf_counter()
    records = backend.quantize(baseline, tokenizer, config, calibration, folder)
    seconds, peak = time.perf_counter() - started, above_held.read()
    meta = {"records": [dataclasses.asdict(r) for r in records], "quantize_seconds": seconds,
            "quantize_peak_bytes": peak if backend.runs_in_process else None}
    (folder / BUILD_LOG).write_text(json.dumps(meta, indent=1))


def read_build(folder: Path) -> tuple[list[LayerRecord], float, int | None]:
    """A built folder's per-layer records, its build time in seconds and its peak memory (None: not measured)."""
    meta = json.loads((folder / BUILD_LOG).read_text())
    records = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in meta["records"]]
    return records, meta["quantize_seconds"], meta.get("quantize_peak_bytes")


def packed_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every layer of a library's model that holds packed weights: ``qweight`` (GPTQ, AWQ) or
    compressed-tensors' ``weight_packed``."""
    for name, module in model.named_modules():
        packed = getattr(module, "qweight", getattr(module, "weight_packed", None))
        if isinstance(packed, torch.Tensor):
            yield name, module


def records_from_model(model: nn.Module) -> list[LayerRecord]:
    """The per-layer log of a model a library quantized, from the bits and group size each packed layer declares."""
    records = []
    for name, module in packed_layers(model):
        # GPTQModel's layers carry bits and group_size; compressed-tensors keeps a torch Linear and its scheme
        declared = getattr(getattr(module, "quantization_scheme", None), "weights", None) or module
        bits = getattr(declared, "bits", None) or getattr(declared, "num_bits", None)
        group = getattr(declared, "group_size", None)
        group = None if group in (None, -1) else int(group)
        shape = (int(getattr(module, "out_features", 0)), int(getattr(module, "in_features", 0)))
        records.append(LayerRecord(name, shape, bits and int(bits), group, group, None, 0.0,
                                   note=type(module).__name__))
    return records


def kernel_names(model: nn.Module) -> str:
    """The classes that run a loaded model's quantized layers, e.g. ``TorchAtenLinear (210 layers)``."""
    counts = Counter(type(module).__name__ if not hasattr(module, "quantization_scheme") else
                     f"compressed-tensors {getattr(module.quantization_scheme.format, 'value', 'packed')}, "
                     "unpacked in every forward" for _, module in packed_layers(model))
    return ", ".join(f"{kind} ({n} layers)" for kind, n in sorted(counts.items())) or "none (no packed layers)"


def save_plain(baseline: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save the baseline as a plain transformers folder. A model loaded from GGUF carries transformers' GGUF
    quantizer, which refuses to serialize although its weights are already dequantized floats."""
    model = copy.copy(baseline)  # a shallow copy shares the weights; only the two attributes below differ
    model.hf_quantizer = None
    model.config = copy.deepcopy(baseline.config)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
