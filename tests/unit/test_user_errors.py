"""What a user can get wrong, each answered by one line naming the file, field, option or variable: exit status 2
from ``quant``, pytest's usage error (4) from the plugin; never a traceback, silence, or a green run of no tests."""
import json
import shutil

import pytest

from quant.cli import main
from quant.config import ConfigError, load_yaml
from quant.matrix import load_matrix
from quant.project import CACHE_DIR_ENV, cache_dir
from tests.helpers.matrices import edited_matrix
from tests.helpers.repo import REPO_ROOT


def _one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("quant: "), error
    return error[0]


def test_a_misspelt_profile_stops_the_report_before_anything_runs(capsys):
    line = _one_line(capsys, ["report", "--profile", "nosuch", "-k", "smollm2-135m-rtn-w4g128-wikitext"])
    assert "--profile nosuch:" in line and "its profiles: report, test" in line


# pytest run in this process: pytest-benchmark would ask git for the project's name, in a process of its own
INLINE = ("-p", "no:cacheprovider", "-p", "no:benchmark")


@pytest.fixture
def team(pytester, monkeypatch):
    """The example team's folder as pytest's rootdir: its pyproject.toml names its matrix."""
    monkeypatch.delenv("QUANT_MATRIX", raising=False)
    monkeypatch.delenv("QUANT_PROFILE", raising=False)
    shutil.copytree(REPO_ROOT / "examples" / "team", pytester.path, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("baselines", "reports"))
    return pytester


@pytest.mark.parametrize("how", ["environment", "option with --plan"])
def test_a_misspelt_profile_is_a_usage_error_in_pytest(team, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("QUANT_PROFILE", "nosuch")
        result = team.runpytest("--co", "-q", *INLINE)
    else:
        result = team.runpytest("--profile", "nosuch", "--plan", *INLINE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stderr.str() + result.stdout.str()
    result.stderr.fnmatch_lines(["*--profile (or $QUANT_PROFILE) nosuch: *quant.yaml has no such profile*"])


def test_a_cache_folder_under_a_file_or_not_writable_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "file" / "cache"))
    with pytest.raises(ConfigError, match=rf"\$QUANT_CACHE_DIR points at .*cache, and {tmp_path / 'file'} is a file"):
        cache_dir()
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.setattr("os.access", lambda path, mode: False)  # (root writes anywhere: the refusal, as a user sees it)
    with pytest.raises(ConfigError, match=f"and {tmp_path} cannot be written by this user"):
        cache_dir()


def test_a_truncated_checkpoint_config_or_a_gguf_folder_is_named(capsys, tmp_path):
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "config.json").write_text("{}")
    (candidate / "quantize_config.json").write_text('{"bits": 4, "group_')
    line = _one_line(capsys, ["check", "--base", "smollm2-135m", "--candidate", str(candidate)])
    assert f"{candidate / 'quantize_config.json'}:1: not valid JSON" in line
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model.Q4_0.gguf").write_bytes(b"GGUF")
    line = _one_line(capsys, ["check", "--base", "smollm2-135m", "--candidate", str(gguf)])
    assert "a GGUF file, which is not a checkpoint format `check` reads" in line and "gptq" in line


@pytest.mark.parametrize("edit,message", [
    (lambda raw: raw["defaults"]["snapshot_tolerance"].update(perplexty={"rel": 0.01}),
     r"matrix.yaml:\d+: defaults.snapshot_tolerance.perplexty: no task of the matrix reports a metric 'perplexty'"),
    (lambda raw: raw["profiles"]["test"]["cpu"].setdefault("options", {}).update(gsm8k={"max_new_token": 64}),
     r"matrix.yaml:\d+: profiles.test.cpu.options.gsm8k.max_new_token: task 'gsm8k' \(kind generate\) has no option "
     r"'max_new_token'; it reads \[.*'max_new_tokens'"),
])
def test_a_misspelt_tolerance_metric_or_profile_option_is_named_at_its_line(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_matrix(edited_matrix(tmp_path, edit))


def test_a_key_written_twice_is_named_at_both_lines(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text("seed: 1\nprofiles:\n  test: {}\nseed: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: 'seed' is written twice \(first on line 1\)"):
        load_yaml(path)
    path.write_text("base: &base {a: 1}\nuse:\n  <<: *base\n  a: 2\n")  # overriding a merged key is no repeat
    assert load_yaml(path)["use"] == {"a": 2}
    path.write_text(json.dumps({"a": 1}))
    assert load_yaml(path) == {"a": 1}
