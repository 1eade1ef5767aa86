"""The ``quant quantize`` command: one model, one config, its log."""
from quant.cli import main


def test_quantize_refuses_unknown_names(capsys):
    assert main(["quantize", "smollm2-135m", "gptq-w5g7"]) == 2
    assert "unknown model 'smollm2-135m' or quant config 'gptq-w5g7'" in capsys.readouterr().err


def test_quantize_prints_the_layer_log(capsys):
    assert main(["quantize", "smollm2-135m", "rtn-w4g128", "--profile", "test"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m rtn-w4g128: 210 layers quantized in" in out
    assert "group-size fallbacks: 180 layers" in out  # 576-wide inputs: 128 does not divide them
