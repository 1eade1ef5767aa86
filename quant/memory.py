"""Memory a process or a GPU holds, read the same way wherever it is recorded: the peak since a reset and what is
in use now (allocated on a GPU, resident on a Linux CPU). A quantized model's build records its peak through
``PeakAboveHeld`` into the result cache, so this module is in the cache key; perf's serving figures read it too."""
from __future__ import annotations

from pathlib import Path

import torch

PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_memory(device: str, reset: bool = False) -> int | None:
    """Peak bytes since the last reset: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) on Linux CPUs; None where neither exists."""
    if device.startswith("cuda"):
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated()
    if not PROC_STATUS.exists():
        return None
    if reset:
        PROC_CLEAR_REFS.write_text("5")
    return _proc_status_bytes("VmHWM:")


def memory_in_use(device: str) -> int | None:
    """Bytes in use now, counted as ``peak_memory`` counts them: allocated on a GPU, resident (VmRSS) on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    return _proc_status_bytes("VmRSS:") if PROC_STATUS.exists() else None


class PeakAboveHeld:
    """The most memory in use, since it was made, above what was in use then (the peak counter is reset when it is
    made): what a piece of work allocated on top of what the process already held, such as the baseline beside a
    quantized model. On a CPU that is resident-set growth, a lower bound: pages the allocator kept from earlier work
    are reused without growing it. None where memory cannot be read."""

    def __init__(self, device: str) -> None:
        self.device, self.held = device, memory_in_use(device)
        peak_memory(device, reset=True)

    def read(self) -> int | None:
        peak = peak_memory(self.device)
        return None if peak is None or self.held is None else max(peak - self.held, 0)


def _proc_status_bytes(field: str) -> int:
    line = next(line for line in PROC_STATUS.read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024
