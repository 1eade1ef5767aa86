"""The unit tier's guard (tests/unit/conftest.py) refuses what a unit test must not do."""
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM  # loaded before the guard runs, as a test module's imports are

import quant.models
from quant.models import ModelSpec


def test_a_process_is_refused():
    with pytest.raises(AssertionError, match="unit tier: this test starts a process"):
        subprocess.run([sys.executable, "-c", "pass"])


def test_a_compiler_is_refused_and_a_stand_in_is_not():
    with pytest.raises(AssertionError, match="unit tier: this test compiles"):
        torch.compile(torch.nn.Linear(2, 2), backend="inductor")
    torch.compile(torch.nn.Linear(2, 2), backend=lambda graph, inputs: graph.forward)


def test_loading_a_model_from_files_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="unit tier: this test loads a model"):
        quant.models.load_model(ModelSpec("m", hf_id=str(tmp_path)))
    with pytest.raises(AssertionError, match="unit tier: this test loads a model"):
        LlamaForCausalLM.from_pretrained(tmp_path)
