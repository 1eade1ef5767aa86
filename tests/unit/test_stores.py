"""The stores behind a run (quant/stores.py), on what they decide without a model: the profile's options and counts
applied per model, and the evaluation items, chosen once per tier and task and keyed by their content."""
import dataclasses

import pytest
import torch

from quant.config import QuantConfig
from quant.matrix import load_matrix
from quant.stores import ModelStore, ResultStore, RunSettings, compare_builds


@pytest.fixture(scope="module")
def settings(shared_data):
    return RunSettings(load_matrix(), "report", shared_data)


def test_a_profile_overrides_task_options_and_calibration_per_tier(settings):
    matrix = settings.matrix
    cpu, gpu = matrix.models["smollm2-135m"], matrix.models["llama-3.2-1b"]
    assert settings.task(cpu, "gsm8k")["max_new_tokens"] == 160  # profiles.report.cpu.options
    assert settings.task(gpu, "gsm8k")["max_new_tokens"] == matrix.tasks["gsm8k"]["max_new_tokens"]
    assert settings.calibration_config(cpu, QuantConfig()).calib_samples == 16
    assert settings.calibration_config(gpu, QuantConfig()).calib_chunk == 16
    assert dataclasses.replace(settings, calib_samples=4).calibration_config(cpu, QuantConfig()).calib_samples == 4
    assert settings.device_for(cpu) == "cpu" and dataclasses.replace(settings, device="cuda").device_for(cpu) == "cpu"
    assert dataclasses.replace(settings, device="cuda").device_for(gpu) == "cuda"


def test_items_are_the_profiles_count_and_their_content_is_in_the_key(settings):
    results = ResultStore(settings, ModelStore(settings), candidates=None)
    spec = settings.matrix.models["smollm2-135m"]
    items = results.items(spec, "boolq")
    assert len(items) == 48 and results.items(spec, "boolq") is items  # chosen once
    other = ResultStore(dataclasses.replace(settings, profile="test"), ModelStore(settings), candidates=None)
    assert len(other.items(spec, "boolq")) == 32
    assert other.items_fingerprint(spec, "boolq") != results.items_fingerprint(spec, "boolq")


def test_two_builds_are_compared_tensor_by_tensor(tmp_path):
    from safetensors.torch import save_file

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, y in ((first, [1.0, 1.0]), (second, [1.0, 2.0])):
        folder.mkdir()
        save_file({"x": torch.zeros(3), "y": torch.tensor(y)}, folder / "model.safetensors")
    assert compare_builds(first, first).describe() == "bit-identical (2 tensors)"
    differ = compare_builds(first, second)
    assert not differ.identical and differ.differing == ["y"] and differ.describe() == "1 of 2 tensors differ (y)"
    save_file({"z": torch.zeros(1)}, second / "extra.safetensors")  # a tensor only one build wrote
    assert sorted(compare_builds(first, second).differing) == ["y", "z"]
