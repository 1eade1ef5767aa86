"""The unit tier's rule, enforced: a unit test starts no process, compiles nothing and loads no model from files
(a tiny random model built in memory is fine). A test that needs one of them belongs in tests/integration."""
from __future__ import annotations

import multiprocessing.process
import subprocess
import sys

import pytest
import torch

import quant.models


def _refused(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unit tier: this test {what}; it belongs in tests/integration")

    return refuse


def _stand_in_compiles_only(real):
    """torch.compile with a stand-in backend (a function a test passes) or dynamo's ``eager`` (traced, run as it is)
    compiles nothing; with a compiler, refused."""
    def compile_(model=None, *, backend="inductor", **options):
        if not callable(backend) and backend != "eager":
            _refused("compiles")()
        return real(model, backend=backend, **options)

    return compile_


@pytest.fixture(autouse=True)
def unit_tier(monkeypatch):
    monkeypatch.setattr(subprocess.Popen, "__init__", _refused("starts a process"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refused("starts a process"))
    monkeypatch.setattr(torch, "compile", _stand_in_compiles_only(torch.compile))
    if "torch._inductor" in sys.modules:  # (touching it imports the compiler: seconds per test)
        monkeypatch.setattr(sys.modules["torch._inductor"], "aoti_compile_and_package", _refused("compiles"))
    monkeypatch.setattr(quant.models, "_from_pretrained", _refused("loads a model"))  # every model quant loads
    if "transformers.modeling_utils" in sys.modules:  # (touching it imports transformers' models: seconds per test)
        monkeypatch.setattr(sys.modules["transformers.modeling_utils"].PreTrainedModel, "from_pretrained",
                            classmethod(_refused("loads a model")))
