"""What reused_heap saves on a calibration walk in small: page faults with and without it, recorded in the
benchmark's extra_info (``make bench``). A measurement, not an assertion: how well freed blocks fit later
requests depends on the heap's layout, which moves with address randomisation and the CPU kernels torch picks
(as a default-run test the ratio failed 3 runs in 6)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import contextlib, resource, torch
from torch import nn
from quant.methods.base import reused_heap

torch.manual_seed(0)
block = nn.Sequential(nn.Linear(256, 1024), nn.SiLU(), nn.Linear(1024, 256))

@torch.no_grad()
def walk_faults(context, steps=8):
    # Each step feeds the last output through a block whose 64 MiB intermediates are allocated and freed; only
    # the second half is counted: the heap has to grow first.
    with context:
        hidden = torch.randn(64, 256, 256)
        per_step = []
        for _ in range(steps):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            hidden = block(hidden)
            per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(per_step[steps // 2:])

print(walk_faults(contextlib.nullcontext()), walk_faults(reused_heap()))
"""


@pytest.mark.parametrize("cpu_capability", ["default", "avx2"])
def test_calibration_walk_page_faults(benchmark, cpu_capability):
    if not sys.platform.startswith("linux"):
        pytest.skip("reused_heap tunes glibc's allocator; elsewhere it changes nothing")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cpu_capability}

    def probe() -> tuple[int, int]:  # a fresh process: memory that earlier tests left cannot serve the blocks
        result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
        plain, reused = map(int, result.stdout.split())
        return plain, reused

    plain, reused = benchmark.pedantic(probe, rounds=1, iterations=1)
    benchmark.extra_info.update({"page_faults_plain": plain, "page_faults_reused_heap": reused,
                                 "ratio": reused / max(plain, 1)})
