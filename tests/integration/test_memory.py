"""Memory read where it is recorded: the peak since a reset, what is in use now, and a piece of work's peak above
what the process held before it."""
import subprocess
import sys

import pytest

from quant import memory
from quant.memory import PeakAboveHeld, peak_memory


PEAK_PROBE = """
import torch
from quant.memory import peak_memory
peak_memory("cpu", reset=True)
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
with_block = peak_memory("cpu")
del block
print(with_block - peak_memory("cpu", reset=True))
"""


def test_peak_memory_reset_forgets_an_earlier_peak():
    if peak_memory("cpu") is None:
        pytest.skip("no /proc/self/status on this platform: peak RSS is not measured here")
    # In a fresh process: in this one, a 64 MiB block may land in memory that earlier tests left resident,
    # and then the peak does not move (seen in a full run).
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True)
    assert int(result.stdout) >= 48 * 2**20, result.stdout


def test_a_pieces_peak_is_counted_above_what_was_held_when_it_began(monkeypatch):
    counter = {"held": 500, "peak": 900}

    def fake_peak(device, reset=False):
        if reset:
            counter["peak"] = counter["held"]
        return counter["peak"]

    monkeypatch.setattr(memory, "memory_in_use", lambda device: counter["held"])
    monkeypatch.setattr(memory, "peak_memory", fake_peak)
    above_held = PeakAboveHeld("cpu")  # the earlier peak of 900 is forgotten
    counter["peak"] = 800
    assert above_held.read() == 300
    counter["peak"] = 400  # never below nothing: a peak under what was held (freed pages) is no growth
    assert above_held.read() == 0
    monkeypatch.setattr(memory, "memory_in_use", lambda device: None)
    assert PeakAboveHeld("cpu").read() is None  # memory that cannot be read is not a zero
