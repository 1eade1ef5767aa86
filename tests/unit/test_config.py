"""Quantization configs (their checks, labels and identity) and where the matrix, data and caches live."""
import re
from pathlib import Path

import pytest

from quant.config import DATA_DIR_ENV, ConfigError, QuantConfig, data_dir, load_yaml


def test_a_config_without_an_lm_head_setting_keeps_its_identity():
    """Cache keys and snapshot fingerprints hash to_dict(): the lm_head fields appear only when set."""
    assert "lm_head_bits" not in QuantConfig().to_dict()
    assert QuantConfig(lm_head_bits=8).to_dict()["lm_head_bits"] == 8
    with pytest.raises(ConfigError, match="lm_head_group_size=64 needs lm_head_bits"):
        QuantConfig(lm_head_group_size=64)
    with pytest.raises(ConfigError, match="lm_head_bits=9"):
        QuantConfig(lm_head_bits=9)


@pytest.mark.parametrize("field,value,message", [
    ("group_size", 8, "group_size=8: use an even group size >= 16"),
    ("group_size", 33, "group_size=33: use an even group size >= 16"),
    ("sym", "yes", "sym='yes': must be true or false"),
    ("bits", 4.5, "bits=4.5: must be an integer"),
    ("bits", True, "bits=True: must be an integer"),
    ("calib_chunk", 0, "calib_chunk=0: use a positive number of samples"),
    ("damp_percent", "1%", "damp_percent='1%': must be a number"),
])
def test_a_config_value_of_the_wrong_kind_is_refused_with_its_field(field, value, message):
    with pytest.raises(ConfigError, match=f"quant.x: {re.escape(message)}"):
        QuantConfig.from_dict({"method": "gptq", field: value}, where="quant.x")


def test_calibration_dtype_is_checked():
    with pytest.raises(ConfigError, match="calib_dtype='fp8': use one of float32, bfloat16, float16"):
        QuantConfig(method="gptq", calib_dtype="fp8")
    with pytest.raises(ConfigError, match="applies to gptq only, not gsq"):
        QuantConfig(method="gsq", calib_dtype="bfloat16")


@pytest.mark.parametrize("fields,label", [
    ({}, "w4g128-sym"),
    ({"bits": 8, "group_size": None, "sym": False}, "w8-asym"),
    ({"method": "gsq", "group_size": 32, "explicit_scales": True}, "w4g32-sym-xs"),
    ({"lm_head_bits": 8, "lm_head_group_size": 64}, "w4g128-sym-head8g64"),
    ({"backend": "gptqmodel", "group_size": 64}, "gptqmodel w4g64-sym"),
    ({"checkpoint": "/models/my-awq"}, "checkpoint my-awq"),
])
def test_a_label_names_bits_groups_grid_and_who_built_it(fields, label):
    assert QuantConfig.from_dict(fields).label == label


def test_layer_overrides_apply_by_name_and_skip_keeps_a_layer_in_full_precision():
    config = QuantConfig.from_dict({"bits": 4, "group_size": 32,
                                    "layer_overrides": {"down_proj": {"bits": 8}, "lm_head": "skip"}})
    assert config.for_layer("model.layers.3.mlp.down_proj") == QuantConfig(bits=8, group_size=32)
    assert config.for_layer("model.layers.3.mlp.up_proj") is config
    assert config.for_layer("lm_head") is None


def test_an_unknown_field_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"quant.x: unknown field\(s\) \['group'\]; known: \[.*'group_size'"):
        QuantConfig.from_dict({"group": 64}, where="quant.x")


def test_a_checkpoint_is_loaded_not_built():
    assert QuantConfig.from_dict({"checkpoint": "/models/a"}).method == "checkpoint"
    with pytest.raises(ConfigError, match="is loaded, not built: leave out backend='gptqmodel'"):
        QuantConfig.from_dict({"checkpoint": "/models/a", "backend": "gptqmodel"})


def test_a_yaml_file_that_is_missing_or_broken_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{re.escape(str(tmp_path / 'none.yaml'))}: file not found"):
        load_yaml(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("cases: [a, b\n")
    with pytest.raises(ConfigError, match=f"(?s){re.escape(str(broken))}: not valid YAML: .*line 1, column 8"):
        load_yaml(broken)
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_the_data_folder_comes_from_the_flag_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path.resolve()
    monkeypatch.setenv(DATA_DIR_ENV, "")
    assert data_dir() is None  # the hub
    with pytest.raises(ConfigError, match=f"{DATA_DIR_ENV}/--data-dir points at .*nowhere, which is not a folder"):
        data_dir(tmp_path / "nowhere")
