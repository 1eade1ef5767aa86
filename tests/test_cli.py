"""The ``quant quantize`` command: one model, one config, its log."""
import re

from quant.cli import main


def test_quantize_refuses_unknown_names(capsys):
    assert main(["quantize", "smollm2-135m", "gptq-w5g7"]) == 2
    assert "unknown model 'smollm2-135m' or quant config 'gptq-w5g7'" in capsys.readouterr().err


def test_quantize_prints_the_layer_log(capsys):
    assert main(["quantize", "smollm2-135m", "rtn-w4g128", "--profile", "test"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m rtn-w4g128: 210 layers quantized in" in out
    assert "group-size fallbacks: 180 layers" in out  # 576-wide inputs: 128 does not divide them


def test_quantize_splits_a_calibrated_build_into_hessians_layers_and_block_runs(capsys, workbench):
    # The same build (and cache entry) as the matrix's gptq-w4g128 cases in the test profile.
    data = ["--data-dir", str(workbench.data_dir)] if workbench.data_dir else []
    assert main(["quantize", "smollm2-135m", "gptq-w4g128", "--profile", "test", *data]) == 0
    out = capsys.readouterr().out
    assert "calibration: wikitext2 test, second half: 16 x 512 tokens" in out
    line = next(line for line in out.splitlines() if line.startswith("time: "))
    hessians, layers, rest = (float(word) for word in re.findall(r"([\d.]+) s", line))
    assert hessians > 0 and layers > 0 and rest > 0, line


def test_quantize_refuses_a_calibration_dtype_for_a_method_without_calibration(capsys):
    assert main(["quantize", "smollm2-135m", "rtn-w4g128", "--calib-dtype", "bfloat16"]) == 2
    assert "calib_dtype='bfloat16' applies to gptq only, not rtn" in capsys.readouterr().err
