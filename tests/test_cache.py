"""The cache under concurrent writers and interrupted builds."""
import dataclasses
import importlib.metadata
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest

from quant import cache
from quant.cache import PACKAGE_DIR, source_hash, cached_dir, cached_json, key_of
from quant.config import QuantConfig
from quant.matrix import load_matrix
from quant.models import ModelSpec
from quant.pipeline import Workbench
from quant.snapshots import fingerprint
from quant.tasks import load_tasks


def _slow_build(root: str, counter: str) -> str:
    def build(folder: Path) -> None:
        with open(counter, "a") as handle:
            handle.write("built\n")
        time.sleep(1.0)  # long enough that the other process arrives mid-build
        (folder / "payload").write_text("complete")

    path = cached_dir("race", {"entry": 1}, build, root=Path(root))
    return (path / "payload").read_text()


def test_racing_processes_build_once_and_never_read_half_written(tmp_path):
    counter = tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_slow_build, [(str(tmp_path), str(counter))] * 3)
    assert results == ["complete"] * 3
    assert counter.read_text().count("built") == 1


def test_interrupted_build_leaves_no_entry(tmp_path):
    def failing(folder: Path) -> None:
        (folder / "partial").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dir("broken", {"entry": 2}, failing, root=tmp_path)
    assert not [p for p in (tmp_path / "broken").iterdir() if not p.name.endswith(".lock")]
    assert cached_json("broken", {"entry": 2}, lambda: {"ok": True}, root=tmp_path) == {"ok": True}


def test_keys_separate_different_inputs(tmp_path):
    first = cached_json("values", {"x": 1}, lambda: 1, root=tmp_path)
    second = cached_json("values", {"x": 2}, lambda: 2, root=tmp_path)
    again = cached_json("values", {"x": 1}, lambda: pytest.fail("recomputed a cached entry"), root=tmp_path)
    assert (first, second, again) == (1, 2, 1)


def test_a_library_upgrade_changes_every_key(monkeypatch):
    before = key_of({"entry": 1})
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "transformers" else real_version(name))
    assert key_of({"entry": 1}) != before


def test_the_code_that_selects_items_and_computes_metrics_changes_the_key(tmp_path, monkeypatch):
    package = tmp_path / "quant"
    shutil.copytree(cache.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "PACKAGE_DIR", package)
    before = cache.code_version.__wrapped__()
    for module in ("stores.py", "metrics.py", "data.py", "kinds/rerank.py", "kinds/lm.py"):
        (package / module).write_text((package / module).read_text() + "\n# changed\n")
        after = cache.code_version.__wrapped__()
        assert after != before, module
        before = after


@pytest.mark.parametrize("damage", ["truncate", "alter", "drop"])
def test_a_damaged_entry_is_rebuilt_and_the_log_says_so(tmp_path, caplog, damage):
    folder = cached_dir("models", {"entry": 3}, lambda f: (f / "model.bin").write_bytes(b"x" * 1000), root=tmp_path)
    payload = folder / "model.bin"
    if damage == "truncate":
        payload.write_bytes(b"x" * 10)
    elif damage == "alter":
        payload.write_bytes(b"y" + b"x" * 999)
    else:
        payload.unlink()
    rebuilt = cached_dir("models", {"entry": 3}, lambda f: (f / "model.bin").write_bytes(b"x" * 1000), root=tmp_path)
    assert (rebuilt / "model.bin").read_bytes() == b"x" * 1000
    assert "does not match its recorded checksums" in caplog.text


def _changed(value):
    """A different value of the same field: flipped, shifted, renamed, or set where it was null."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 16
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, tuple):
        return value + (("down_proj", "skip"),)
    return 64 if value is None else pytest.fail(f"no change defined for {value!r}")


# a valid other value where the generic change would not be one
OTHER_VALUES = {"method": "gsq", "bits": 3, "damp_percent": 0.1, "calib_dtype": "bfloat16", "lm_head_bits": 8,
                "backend": "gptqmodel", "checkpoint": "/models/smollm2-gptq"}
# what a field needs set beside it to take another value
REQUIRES = {"lm_head_group_size": {"lm_head_bits": 8}}


@pytest.fixture(scope="module")
def key_workbench(shared_data):
    matrix = load_matrix()
    return Workbench(matrix, "test", shared_data), matrix.models["smollm2-135m"]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(QuantConfig)])
def test_every_quant_config_field_changes_the_quantized_models_key(field, key_workbench):
    """Through the key the workbench builds a quantized model under: a field it left out would share an entry."""
    workbench, spec = key_workbench
    config = QuantConfig(method="gptq", **REQUIRES.get(field, {}))
    changed = dataclasses.replace(config, **{field: OTHER_VALUES.get(field, _changed(getattr(config, field)))})
    assert key_of(workbench.quantized_parts(spec, changed)) != key_of(workbench.quantized_parts(spec, config))


def test_the_weights_change_the_quantized_models_key(key_workbench, tmp_path, monkeypatch):
    workbench, spec = key_workbench
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"one")
    monkeypatch.setenv(spec.override_env, str(folder))
    config = QuantConfig(method="gptq")
    before = key_of(workbench.quantized_parts(spec, config))
    (folder / "model.safetensors").write_bytes(b"two")
    assert key_of(workbench.quantized_parts(spec, config)) != before


def test_every_task_field_and_option_changes_the_key():
    task = load_tasks()["gsm8k"]
    base = key_of({"task": dataclasses.asdict(task)})
    for field in ("name", "loader", "kind"):
        assert key_of({"task": dataclasses.asdict(dataclasses.replace(task, **{field: "x"}))}) != base, field
    for option, value in task.options.items():
        options = {**task.options, option: [value, "changed"] if isinstance(value, (list, str)) else {"changed": value}}
        assert key_of({"task": dataclasses.asdict(dataclasses.replace(task, options=options))}) != base, option


def test_every_weight_source_field_changes_the_models_fingerprint(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    spec = ModelSpec("m", hf_id="org/model", dtype="bfloat16")
    monkeypatch.setenv(spec.override_env, str(folder))
    base = spec.fingerprint()
    assert dataclasses.replace(spec, dtype="float32").fingerprint() != base
    (folder / "config.json").write_text('{"hidden_size": 2}')  # the same folder with other content
    assert spec.fingerprint() != base
    monkeypatch.delenv(spec.override_env)
    hub = spec.fingerprint()
    assert hub["hub"] == "org/model" and dataclasses.replace(spec, hf_id="org/other").fingerprint() != hub


def test_a_changed_data_file_changes_its_results_key(shared_data, tmp_path):
    """Evaluation keys hold the content of the items a result read, and quantized results the calibration text."""
    copy = tmp_path / "data"
    shutil.copytree(shared_data, copy)
    matrix = load_matrix()
    spec = matrix.models["smollm2-135m"]
    parts = lambda folder, task, quant=None: Workbench(matrix, "test", folder).results.span_parts(  # noqa: E731
        spec, task, quant, range(16))
    boolq, calibrated = parts(shared_data, "boolq"), parts(shared_data, "boolq", "gptq-w4g128")
    path = copy / "boolq" / "val.jsonl"
    path.write_text(path.read_text().replace(" the ", " The "))
    assert key_of(parts(copy, "boolq")) != key_of(boolq)
    path = copy / "wikitext2" / "wiki.test.raw"
    path.write_bytes(path.read_bytes()[:-200])  # the end of the text: the calibration half only
    assert key_of(parts(copy, "boolq", "gptq-w4g128")) != key_of(calibrated)


def test_an_entry_without_its_manifest_is_rebuilt(tmp_path):
    """The manifest is written last: without it the build did not finish, whatever the payload looks like."""
    builds = []

    def build(folder):
        builds.append(1)
        (folder / "model.bin").write_bytes(b"x" * 100)

    folder = cached_dir("models", {"entry": 4}, build, root=tmp_path)
    (folder / cache.MANIFEST).unlink()
    assert cached_dir("models", {"entry": 4}, build, root=tmp_path) == folder
    assert len(builds) == 2 and (folder / cache.MANIFEST).is_file()


def test_a_key_does_not_depend_on_the_order_its_parts_were_written_in():
    assert key_of({"a": 1, "b": {"x": 1, "y": 2}}) == key_of({"b": {"y": 2, "x": 1}, "a": 1})
    assert key_of({"a": Path("/x")}) != key_of({"a": Path("/y")})  # non-JSON values enter by their text
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_an_entry_with_an_unreadable_manifest_is_rebuilt(tmp_path, caplog):
    builds = []

    def build(folder):
        builds.append(1)
        (folder / "value.json").write_text("1")

    folder = cached_dir("results", {"entry": 5}, build, root=tmp_path)
    (folder / cache.MANIFEST).write_text('{"payload": ')  # cut off mid-write
    cached_dir("results", {"entry": 5}, build, root=tmp_path)
    assert len(builds) == 2 and "rebuilding" in caplog.text


def test_the_gate_and_the_report_are_outside_the_cache_key(tmp_path):
    """Rewording a verdict, changing how an interval is judged or adding a report column reuses every cached model
    and result; a change to what computes a cached number does not."""
    package = tmp_path / "quant"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_hash(package)
    for name in ("gate.py", "stats.py", "snapshots.py", "pipeline.py", "report.py", "cli.py"):
        (package / name).write_text((package / name).read_text() + "\n# changed\n")
    assert source_hash(package) == before
    (package / "metrics.py").write_text((package / "metrics.py").read_text() + "\n# changed\n")
    assert source_hash(package) != before
