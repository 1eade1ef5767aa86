"""Quantization methods behind one interface (:class:`quant.methods.base.Quantizer`)."""
from __future__ import annotations

from quant.config import ConfigError
from quant.methods.base import LayerRecord, Quantizer
from quant.methods.gptq import GPTQQuantizer
from quant.methods.gsq import GSQ
from quant.methods.rtn import RTN

METHODS: dict[str, type[Quantizer]] = {cls.name: cls for cls in (RTN, GPTQQuantizer, GSQ)}


def get_method(name: str) -> Quantizer:
    try:
        return METHODS[name]()
    except KeyError:
        raise ConfigError(f"unknown quantization method {name!r}; known: {sorted(METHODS)}") from None


__all__ = ["METHODS", "LayerRecord", "Quantizer", "get_method"]
