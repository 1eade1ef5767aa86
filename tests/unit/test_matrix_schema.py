"""matrix.yaml is checked like code (quant/matrix.py against quant/matrix.schema.json): every field typed and
ranged, unknown keys refused at every level, at least one case; each error one line naming the file, the line and
the field, exit status 2 and no traceback."""
import dataclasses
import json

import pytest

from quant.cli import main
from quant.config import QuantConfig
from tests.helpers.matrices import edited_matrix
from tests.helpers.repo import MATRIX_FILE as DEFAULT_MATRIX
from quant.matrix import GATE_FIELDS, SCHEMA_FILE
from quant.models import ModelSpec
from quant.perf import PerfSettings

SCHEMA = json.loads(SCHEMA_FILE.read_text())


def _edited(tmp_path, edit) -> str:
    return str(edited_matrix(tmp_path, edit))


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


@pytest.mark.parametrize("edit,expected", [
    (lambda raw: raw.update(case=raw.pop("cases")), r"matrix.yaml:\d+: case: unknown field.*'cases' is a required"),
    (lambda raw: raw["defaults"].update(retention_min="high"), r"defaults.retention_min: 'high' is not of type 'number'"),
    (lambda raw: raw["defaults"].update(retention_min=5), r"defaults.retention_min: 5 is greater than the maximum of 1"),
    (lambda raw: raw["defaults"].update(retention_minimum=0.9), r"defaults.retention_minimum: unknown field"),
    (lambda raw: raw["profiles"]["test"]["cpu"].update(boolq=-3), r"profiles.test.cpu.boolq: -3 is less than the minimum"),
    (lambda raw: raw["profiles"]["test"]["cpu"].update(gsm8k="ten"), r"profiles.test.cpu.gsm8k: 'ten' is not of type"),
    (lambda raw: raw["defaults"]["snapshot_tolerance"].update(perplexity={"rel": -1}),
     r"defaults.snapshot_tolerance.perplexity.rel: -1 is less than the minimum of 0"),
    (lambda raw: raw.update(cases=[]), r"cases: \[\] should be non-empty"),
    (lambda raw: raw["cases"][2].update(cadance="slow"), r"cases\[2\].cadance: unknown field"),
    (lambda raw: raw["quant"]["rtn-w8"].update(bits=4.5), r"quant.rtn-w8.bits: 4.5 is not of type 'integer'"),
    (lambda raw: raw["models"]["smollm2-135m"].update(tier="tpu"), r"models.smollm2-135m.tier: 'tpu' is not one of"),
])
def test_a_bad_matrix_is_one_line_naming_file_line_and_field(capsys, tmp_path, edit, expected):
    err = _one_line_error(capsys, ["report", "--dry-run", "--matrix", _edited(tmp_path, edit)])
    assert __import__("re").search(expected, err), err


def test_the_error_names_the_line_of_the_field(tmp_path, capsys):
    path = tmp_path / "matrix.yaml"
    text = DEFAULT_MATRIX.read_text().replace("  retention_min: 0.90 ", "  retention_min: high ")
    path.write_text(text)
    line = next(number for number, row in enumerate(text.splitlines(), start=1) if "retention_min: high" in row)
    assert f"{path}:{line}: defaults.retention_min" in _one_line_error(capsys, ["report", "--dry-run", "--matrix", str(path)])


def test_a_missing_model_is_one_line_with_the_variable(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANT_MODEL_SMOLLM2_135M", str(tmp_path / "nonexistent"))
    err = _one_line_error(capsys, ["quantize", "smollm2-135m", "rtn-w4g128"])
    assert "QUANT_MODEL_SMOLLM2_135M=" in err and "no such file or folder" in err


def test_a_dry_run_checks_the_inputs_are_reachable(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANT_MODEL_SMOLLM2_135M", str(tmp_path / "nonexistent"))
    assert main(["report", "--dry-run", "--data-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert f"{tmp_path / 'wikitext2' / 'wiki.test.raw'}: not found" in out
    assert "QUANT_MODEL_SMOLLM2_135M=" in out


def test_a_data_folder_that_is_not_there_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("QUANT_DATA_DIR", "/nonexistent")
    assert "QUANT_DATA_DIR/--data-dir points at /nonexistent" in _one_line_error(capsys, ["report", "--dry-run"])


@pytest.mark.parametrize("argv,expected", [
    (["quantize", "smollm2-135m", "nosuchconfig"], "unknown quant config 'nosuchconfig'"),
    (["quantize", "nosuchmodel", "rtn-w8"], "unknown model 'nosuchmodel'"),
    (["report", "--dry-run", "--hardware", "h10O"], "--hardware 'h10O': not a hardware name"),
])
def test_a_name_the_matrix_does_not_know_is_named(capsys, argv, expected):
    assert expected in _one_line_error(capsys, argv)


def test_the_schema_knows_every_field_the_code_reads():
    """The schema is the one description of the file: a field added to the code and not to the schema (or the
    other way round) fails here, not in a user's editor."""
    defs = SCHEMA["$defs"]
    assert set(defs["quantFields"]["properties"]) | {"layer_overrides"} == {f.name for f in dataclasses.fields(QuantConfig)}
    assert set(defs["model"]["properties"]) == {f.name for f in dataclasses.fields(ModelSpec)} - {"name"}
    assert set(defs["gate"]["properties"]) == set(GATE_FIELDS)
    assert set(defs["tierProfile"]["properties"]["perf"]["properties"]) == {f.name for f in dataclasses.fields(PerfSettings)}
    assert set(defs["tierProfile"]["propertyNames"]["anyOf"][1]["enum"]) == set(defs["tierProfile"]["properties"])


def test_matrix_yaml_points_editors_at_the_schema():
    assert DEFAULT_MATRIX.read_text().splitlines()[0] == f"# yaml-language-server: $schema=quant/{SCHEMA_FILE.name}"
