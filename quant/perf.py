"""Performance facts: what machine produced a result, and how much memory a model holds."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch
import transformers

from quant.qlinear import model_bytes

__all__ = ["machine_facts", "model_bytes"]


def machine_facts(device: str = "cpu") -> dict[str, Any]:
    """Recorded beside every result: device, library versions, thread count."""
    facts = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts
