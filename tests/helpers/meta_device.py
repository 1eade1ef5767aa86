"""The meta device as a second device in CPU tests (tests/unit/test_devices.py, tests/integration/test_replicas.py): where tensors
live, and fake int4 kernels that record which device each kernel call saw."""
from __future__ import annotations

from itertools import chain

import torch

from quant import kernels

META = torch.device("meta")


def devices(module: torch.nn.Module) -> set[torch.device]:
    return {tensor.device for tensor in chain(module.parameters(), module.buffers())}


class KernelCalls:
    """Fake int4 kernels for the meta device, and a record of which kernel saw tensors on which device."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, set[str]]] = []
        for device, kernel in list(kernels.KERNELS.items()):
            monkeypatch.setitem(kernels.KERNELS, device, self._recorded(device, kernel))
        meta = kernels.Kernel(
            "fake meta kernel",
            lambda codes, tiles: torch.empty(codes.shape[0], codes.shape[1] // 2, dtype=torch.uint8, device=codes.device),
            lambda x, packed, group_size, scales: torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype,
                                                              device=x.device))
        monkeypatch.setitem(kernels.KERNELS, "meta", self._recorded("meta", meta))

    def _recorded(self, device: str, kernel: kernels.Kernel) -> kernels.Kernel:
        def pack(codes, tiles):
            self.calls.append((device, {codes.device.type}))
            return kernel.pack(codes, tiles)

        def matmul(x, packed, group_size, scales):
            self.calls.append((device, {x.device.type, packed.device.type, scales.device.type}))
            return kernel.matmul(x, packed, group_size, scales)

        return kernels.Kernel(kernel.name, pack, matmul)

    def mismatched(self) -> list[tuple[str, set[str]]]:
        return [(device, seen) for device, seen in self.calls if seen != {device}]
