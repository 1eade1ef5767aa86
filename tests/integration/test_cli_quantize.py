"""`quant quantize` on the embedded model: the layer log and where a calibrated build's time went."""
import re
from quant.cli import main


def test_quantize_prints_the_layer_log(capsys):
    assert main(["quantize", "smollm2-135m", "rtn-w4g128", "--profile", "test"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m rtn-w4g128: 210 layers quantized in" in out
    assert "group-size fallbacks: 180 layers" in out  # 576-wide inputs: 128 does not divide them


def test_quantize_splits_a_calibrated_build_into_hessians_layers_and_block_runs(capsys, workbench):
    # The same build (and cache entry) as the matrix's gptq-w4g128 cases in the test profile.
    data = ["--data-dir", str(workbench.settings.data_dir)] if workbench.settings.data_dir else []
    assert main(["quantize", "smollm2-135m", "gptq-w4g128", "--profile", "test", *data]) == 0
    out = capsys.readouterr().out
    assert "calibration: wikitext2 test, second half: 16 x 512 tokens" in out
    line = next(line for line in out.splitlines() if line.startswith("time: "))
    hessians, layers, rest = (float(word) for word in re.findall(r"([\d.]+) s", line))
    assert hessians > 0 and layers > 0 and rest > 0, line
