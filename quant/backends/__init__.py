"""Backends behind one interface (:class:`quant.backends.base.Backend`): the in-house methods and the
quantization libraries, each one small module. A quant config names its backend (default: in-house)."""
from __future__ import annotations

from quant.backends.base import Backend, BackendUnavailable
from quant.backends.gptqmodel import GPTQModelBackend
from quant.backends.inhouse import InHouse
from quant.backends.llmcompressor import LLMCompressorBackend
from quant.config import ConfigError

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (InHouse, GPTQModelBackend, LLMCompressorBackend)}


def get_backend(name: str | None, where: str = "quant config") -> Backend:
    try:
        return BACKENDS[name or InHouse.name]()
    except KeyError:
        raise ConfigError(f"{where}: unknown backend {name!r}; known: {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "get_backend"]
