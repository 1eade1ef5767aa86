"""The cache under concurrent writers and interrupted builds."""
import contextlib
import dataclasses
import importlib.metadata
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from quant import cache, tasks
from quant.backends import get_backend
from quant.cache import cached_dir, cached_json, key_of
from quant.config import QuantConfig
from quant.matrix import load_matrix
from quant.models import ModelSpec
from quant.pipeline import Workbench
from quant.snapshots import fingerprint
from quant.tasks import load_tasks


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


# What each artifact's key holds of the code, stated here file by file: the modules that make its content, and
# nothing else. Generated over every artifact and every module of the package: a module the key leaves out, or one
# it holds that makes nothing of the artifact (a gate rule, a report, the wiring, another method), fails.
LOADING = {"config.py", "models.py"}
QUANTIZING = LOADING | {"backends/base.py", "backends/inhouse.py", "calibration.py", "memory.py", "methods/__init__.py",
                        "methods/base.py", "qlinear.py"}
CHECKPOINT_LOADING = {"backends/base.py", "backends/checkpoint.py", "config.py", "memory.py", "methods/__init__.py",
                      "methods/base.py", "qlinear.py"}
EVALUATING = LOADING | {"data.py", "kinds/__init__.py", "kinds/base.py", "kinds/lm.py", "qlinear.py", "tasks.py"}
EXPECTED_CODE = {
    "converted": LOADING,
    "quantized/rtn": QUANTIZING | {"methods/rtn.py"},
    "quantized/gptq": QUANTIZING | {"methods/gptq.py"},
    "quantized/gsq": QUANTIZING | {"methods/gsq.py"},
    "quantized/checkpoint": CHECKPOINT_LOADING,
    "results/boolq": EVALUATING | {"kinds/choice.py"},
    "results/gsm8k": EVALUATING | {"kinds/generate.py"},
    "results/msmarco": EVALUATING | {"kinds/rerank.py", "metrics.py"},
    "results/wikitext": EVALUATING | {"kinds/perplexity.py", "calibration.py"},
    "results/boolq on gptq": EVALUATING | {"kinds/choice.py"} | QUANTIZING | {"methods/gptq.py"},
    "prompts": {"config.py", "kernels.py", "methods/base.py", "qlinear.py"},
    # and the definitions they compile or run (``definition_code``: PromptForward, measure_layers), read from the
    # loaded code; the rest of compiled.py and sensitivity.py makes neither
    "sensitivity": {"calibration.py", "config.py", "data.py", "kinds/base.py", "kinds/lm.py", "kinds/perplexity.py",
                    "methods/base.py", "qlinear.py"},
}
# the library backends, whose keys also hold the library's version (not installed here): their code alone
LIBRARY_CODE = {
    "gptqmodel": CHECKPOINT_LOADING | {"backends/gptqmodel.py"},
    "llmcompressor": CHECKPOINT_LOADING | {"backends/llmcompressor.py", "backends/llmcompressor_job.py"},
}


def artifact_keys(workbench: Workbench, spec: ModelSpec, checkpoint: Path) -> dict[str, Callable[[], str]]:
    """Each artifact's key as the code that builds it computes it, by the name EXPECTED_CODE gives it."""
    from quant.compiled import prompt_code
    from quant.models import model_key
    from quant.sensitivity import sensitivity_code

    quantized = {method: (lambda m=method: key_of(workbench.candidates.parts(spec, QuantConfig(method=m))))
                 for method in ("rtn", "gptq", "gsq")}
    results = {task: (lambda t=task: key_of(workbench.results.span_parts(spec, t, None, range(16))))
               for task in ("boolq", "gsm8k", "msmarco", "wikitext")}
    return {"converted": lambda: key_of(model_key(spec)),
            **{f"quantized/{method}": key for method, key in quantized.items()},
            "quantized/checkpoint": lambda: key_of(workbench.candidates.parts(spec, QuantConfig(
                method="gptq", checkpoint=str(checkpoint)))),
            **{f"results/{task}": key for task, key in results.items()},
            "results/boolq on gptq": lambda: key_of(workbench.results.span_parts(spec, "boolq", "gptq-w4g128",
                                                                                  range(16))),
            "prompts": lambda: key_of(prompt_code()), "sensitivity": sensitivity_code}


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the package whose modules a test edits; keys computed meanwhile read their code from it."""
    package = tmp_path / "quant"
    shutil.copytree(cache.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "PACKAGE_DIR", package)
    cache.code_closure.cache_clear()
    yield package
    cache.code_closure.cache_clear()


@contextlib.contextmanager
def edited(package: Path, module: str, text: str = "\n_edited = True\n"):
    """``module`` (a path under the package) with ``text`` appended, while the block runs."""
    path = package / module
    original = path.read_text()
    path.write_text(original + text)
    cache.code_closure.cache_clear()
    try:
        yield
    finally:
        path.write_text(original)
        cache.code_closure.cache_clear()


@pytest.mark.parametrize("artifact", sorted(EXPECTED_CODE))
def test_each_artifact_key_holds_the_code_that_makes_it_and_no_other(artifact, key_workbench, package_copy, tmp_path):
    workbench, spec = key_workbench
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    key = artifact_keys(workbench, spec, checkpoint)[artifact]
    before = key()
    changed_by = set()
    for path in sorted(package_copy.rglob("*.py")):
        module = path.relative_to(package_copy).as_posix()
        with edited(package_copy, module):
            if key() != before:
                changed_by.add(module)
    assert changed_by == EXPECTED_CODE[artifact]


@pytest.mark.parametrize("backend", sorted(LIBRARY_CODE))
def test_a_library_backends_key_holds_its_code(backend):
    config = QuantConfig(method="gptq", backend=backend)
    entries = tuple(get_backend(backend).code(config))
    assert set(cache.code_closure(entries, cache.PACKAGE_DIR)) == LIBRARY_CODE[backend]


def test_the_artifact_table_names_every_kind_the_cache_holds():
    """Every ``cached_dir`` / ``cached_json`` kind in the package is one of the artifacts above."""
    kinds = set()
    for path in cache.PACKAGE_DIR.rglob("*.py"):
        kinds |= set(re.findall(r"cached_(?:dir|json)\(\s*\"(\w+)\"", path.read_text()))
    assert kinds == {name.split("/")[0] for name in EXPECTED_CODE}


def test_a_docstring_or_a_comment_changes_no_key(package_copy):
    before = cache.code_of("quant.methods.gptq")
    with edited(package_copy, "methods/gptq.py", "\n# a comment\n"):
        assert cache.code_of("quant.methods.gptq") == before
    path = package_copy / "methods" / "gptq.py"
    path.write_text(path.read_text().replace('"""', '"""Reworded. ', 1))
    cache.code_closure.cache_clear()
    assert cache.code_of("quant.methods.gptq") == before
    with edited(package_copy, "methods/gptq.py", "\nLOG_LINE = 'a statement, not a comment'\n"):
        assert cache.code_of("quant.methods.gptq") != before


def test_a_definitions_code_is_its_own():
    from quant.compiled import PromptForward
    from quant.sensitivity import measure_layers

    assert cache.definition_code(measure_layers) == cache.definition_code(measure_layers)
    assert cache.definition_code(measure_layers) != cache.definition_code(PromptForward)


def test_an_edited_task_prompt_rebuilds_no_model_and_recomputes_only_that_tasks_results(
        shared_data, package_copy, monkeypatch):
    """Through the matrix as loaded from a copy of the package whose tasks.yaml has another BoolQ prompt."""
    def keys() -> dict[str, str]:
        matrix = load_matrix()
        workbench, spec = Workbench(matrix, "test", shared_data), matrix.models["smollm2-135m"]
        quantized = {name: key_of(workbench.candidates.parts(spec, workbench.calibration_config(spec, config)))
                     for name, config in matrix.quant.items() if not config.backend and not config.checkpoint}
        results = {f"{task} {quant}": key_of(workbench.results.span_parts(spec, task, quant, range(16)))
                   for task in ("boolq", "gsm8k", "msmarco", "wikitext") for quant in (None, *quantized)}
        return {**quantized, **results}

    before = keys()
    tasks_file = package_copy / "tasks.yaml"
    text = tasks_file.read_text()
    assert text.count("Question: {question}?") == 1  # BoolQ's prompt, and no other task's
    tasks_file.write_text(text.replace("Question: {question}?", "Q: {question}?"))
    monkeypatch.setattr(tasks, "TASKS_FILE", tasks_file)
    after = keys()
    assert sorted(name for name in before if before[name] != after[name]) == sorted(
        name for name in before if name.startswith("boolq "))


def test_an_edited_method_rebuilds_the_models_built_with_it_and_no_other(key_workbench, package_copy):
    workbench, spec = key_workbench
    configs = {name: config for name, config in workbench.settings.matrix.quant.items()
               if not config.backend and not config.checkpoint}
    keys = lambda: {name: key_of(workbench.candidates.parts(spec, config))  # noqa: E731
                    for name, config in configs.items()}
    before = keys()
    with edited(package_copy, "methods/gptq.py"):
        after = keys()
    assert {name for name in configs if before[name] != after[name]} == {
        name for name, config in configs.items() if config.method == "gptq"}
    assert any(config.method != "gptq" for config in configs.values())


def test_the_device_changes_the_quantized_models_key(shared_data):
    matrix = load_matrix()
    spec = dataclasses.replace(matrix.models["smollm2-135m"], tier="gpu")
    config = QuantConfig(method="rtn")
    keys = {device: key_of(Workbench(matrix, "test", shared_data, device).candidates.parts(spec, config))
            for device in ("cpu", "cuda")}
    assert keys["cpu"] != keys["cuda"]
