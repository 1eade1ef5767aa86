"""Snapshot tolerances from measured noise (quant/noise.py): deviations from the unchanged run, the tolerance each
gives in the matrix's own unit, and the matrix.yaml section they are written to and read back from."""
import json
import shutil

import pytest

from quant import noise
from quant.config import ConfigError
from quant.matrix import load_matrix
from tests.helpers.repo import BASELINES

MATRIX = load_matrix()
CASES = {case.id: case for case in MATRIX.cases}
WIKITEXT, BOOLQ = CASES["smollm2-135m-rtn-w4g128-wikitext"], CASES["smollm2-135m-rtn-w4g128-boolq"]


def _run(perplexity: float, accuracy: float, same_top: float = 0.6) -> dict:
    return {WIKITEXT.id: {"n": 6, "metrics": {"baseline.perplexity": 29.0, "quantized.perplexity": perplexity,
                                              "quantized.same_top_p": same_top}},
            BOOLQ.id: {"n": 32, "metrics": {"baseline.accuracy": 0.5, "quantized.accuracy": accuracy}}}


def test_the_largest_deviation_of_any_perturbed_run_and_its_cause():
    reference = _run(44.0, 0.5)
    runs = {"one thread": _run(44.1, 0.5), "AVX2 code path": _run(43.5, 0.5625), "batch x2": _run(44.0, 0.5)}
    found = noise.deviations(reference, runs)
    assert found[WIKITEXT.id]["perplexity"] == pytest.approx((0.5, "AVX2 code path"))
    assert found[BOOLQ.id]["accuracy"] == pytest.approx((0.0625, "AVX2 code path"))  # 2 of 32 answers
    assert found[WIKITEXT.id]["same_top_p"][0] == 0


def test_tolerances_are_a_multiple_of_the_deviation_in_the_matrixs_unit_never_finer_than_the_resolution():
    reference = _run(44.0, 0.5)
    found = noise.deviations(reference, {"AVX2 code path": _run(44.88, 0.5625)})
    tolerances = noise.measured_tolerances([WIKITEXT, BOOLQ], reference, found)
    # perplexity is relative in the matrix: 3 x 0.88 / 44 = 6%; BoolQ counts items: 3 x 2 = 6
    assert tolerances[WIKITEXT.id]["perplexity"] == {"rel": 0.06}
    assert tolerances[BOOLQ.id]["accuracy"] == {"items": 6}
    assert tolerances[WIKITEXT.id]["same_top_p"] == {"abs": noise.RESOLUTION["abs"]}  # did not move
    assert noise.tolerance_from(0.0, "items", 0.5, 32) == 1


def test_the_written_section_replaces_the_matrixs_tolerances_metric_by_metric(tmp_path):
    path = tmp_path / "matrix.yaml"
    shutil.copy(MATRIX.path, path)
    noise.write_section(path, "")  # the hand-set tolerances alone
    hand_set = {case.id: case.gate["snapshot_tolerance"] for case in load_matrix(path).cases}
    text = noise.section_text({WIKITEXT.id: {"perplexity": {"rel": 0.06}}}, "python -m quant noise, a test")
    noise.write_section(path, text)
    noise.write_section(path, text)  # a second run replaces the section instead of adding one
    assert path.read_text().count("measured_tolerances:") == 1
    written = {case.id: case.gate["snapshot_tolerance"] for case in load_matrix(path).cases}
    assert written[WIKITEXT.id] == {**hand_set[WIKITEXT.id], "perplexity": {"rel": 0.06}}
    other = "smollm2-135m-rtn-w4g128-msmarco"
    assert written[other] == hand_set[other]  # not measured
    noise.write_section(path, noise.section_text({"smollm2-135m-rtn-w4g128-wikitxt": {}}, "a typo"))
    with pytest.raises(ConfigError, match="wikitxt"):
        load_matrix(path)


def test_the_batch_perturbation_scales_every_tasks_batch():
    scaled = noise.scaled_batches(MATRIX, "test", "cpu", 2)
    options = scaled.limits("test", "cpu")["options"]
    assert options["wikitext"]["batch_size"] == 8 and options["boolq"]["batch_size"] == 16
    assert options["gsm8k"]["max_new_tokens"] == MATRIX.limits("test", "cpu")["options"]["gsm8k"]["max_new_tokens"]
    assert "batch_size" not in MATRIX.limits("test", "cpu")["options"]["gsm8k"]  # the matrix itself is untouched


def test_the_committed_snapshots_count_as_a_run_from_another_machine():
    stored = json.loads((BASELINES / "cpu" / "test" / "test_matrix.json").read_text())
    committed = noise.committed_values("test", [WIKITEXT, CASES["smollm2-135m-rtn-w4g128-gsm8k"]], BASELINES)
    expected = stored[f"test_snapshot[{WIKITEXT.id}]"]["metrics"]["quantized.perplexity"]["value"]
    assert committed[WIKITEXT.id]["metrics"]["quantized.perplexity"] == expected and committed[WIKITEXT.id]["n"] == 6
    assert noise.committed_values("no-such-profile", [WIKITEXT], BASELINES) == {}
