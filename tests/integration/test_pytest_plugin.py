"""The pytest plugin (quant/pytest_plugin.py), run in a scratch project: the joint verdict at the end of a run and
the merge gate's summary file; and the rule that it is the package's only module importing pytest."""
import ast
import shutil
from pathlib import Path

import pytest

from tests.helpers.repo import REPO_ROOT

GATES = '''
import types

import pytest

from quant.gate import Verdict


def comparison(p_value, status):
    return types.SimpleNamespace(p_value=p_value, verdict=Verdict(status, "why"), retention=0.95,
                                 interval=(0.9, 1.0), extra={"detectable_drop": 0.2})


@pytest.mark.parametrize("case_id,p_value,status", [("m-rtn-wikitext", 0.02, "fail")] +
                         [(f"m-q{i}-wikitext", 0.6, "pass") for i in range(4)])
def test_gate(record_gate, case_id, p_value, status):
    record_gate(case_id, comparison(p_value, status))
    assert status != "fail"
'''


def test_the_run_ends_with_the_joint_verdict_and_writes_the_gate_summary(pytester):
    """Five gates, one failing alone at p = 0.02: that test fails, and the joint verdict over the five passes
    (Holm needs 0.005), in the terminal and in the --gate-summary file."""
    pytester.makepyfile(test_gates=GATES)
    summary = pytester.path / "summary.md"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "--gate-summary", str(summary))
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*joint verdict*", "this change: pass, 0 of 5 informative gates fail after Holm's "
                                 "correction (1 before it)"])
    text = summary.read_text()
    assert "| m-rtn-wikitext | fail | 0.950 [0.900, 1.000] | 0.200 | why |" in text
    assert text.rstrip().endswith("**this change: pass, 0 of 5 informative gates fail after Holm's correction "
                                  "(1 before it)**")


def test_only_the_plugin_imports_pytest():
    importers = []
    for path in sorted((REPO_ROOT / "quant").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "pytest" or name.startswith(("pytest.", "_pytest", "syrupy", "xdist")) for name in names):
                importers.append(Path(path).relative_to(REPO_ROOT).as_posix())
    assert sorted(set(importers)) == ["quant/pytest_plugin.py"]


NO_TORCH = '''
import sys


def test_own():
    assert "torch" not in sys.modules and "transformers" not in sys.modules
'''


def test_without_a_matrix_the_plugin_collects_nothing_and_imports_no_torch(pytester, monkeypatch):
    """A project that only has the package installed: its own test runs alone, and torch is never imported."""
    monkeypatch.delenv("QUANT_MATRIX", raising=False)
    pytester.makepyfile(test_own=NO_TORCH)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=1)  # its one test, which also finds no torch imported


def test_asking_for_gpu_cases_without_a_matrix_is_a_usage_error(pytester, monkeypatch):
    monkeypatch.delenv("QUANT_MATRIX", raising=False)
    result = pytester.runpytest_subprocess("-m", "gpu", "-p", "no:cacheprovider")
    assert result.ret == 4
    assert ("-m 'gpu' selects the matrix's gpu cases, but no matrix is configured: looked at --matrix, $QUANT_MATRIX "
            f"and [tool.quant] matrix in {pytester.path / 'pyproject.toml'}") in result.stderr.str()


@pytest.mark.parametrize("where", ["folder", "missing"])
def test_a_matrix_that_is_no_file_is_one_usage_error(pytester, monkeypatch, where):
    monkeypatch.setenv("QUANT_MATRIX", str(pytester.path if where == "folder" else pytester.path / "nowhere.yaml"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 4 and "Traceback" not in result.stderr.str()
    message = "the matrix must be a YAML file, not a folder" if where == "folder" else "matrix file not found"
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_the_projects_matrix_is_collected_as_two_tests_per_case(pytester, monkeypatch):
    """[tool.quant] matrix in the rootdir's pyproject.toml: a bare pytest collects the matrix file's cases beside the
    project's own tests, with the ids the cases have everywhere."""
    monkeypatch.delenv("QUANT_MATRIX", raising=False)
    shutil.copytree(REPO_ROOT / "examples" / "team", pytester.path, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("baselines", "reports"))
    pytester.makepyfile(test_own="def test_own():\n    pass\n")
    result = pytester.runpytest("--co", "-q", "-p", "no:cacheprovider")
    ids = [line for line in result.outlines if "::" in line]
    assert sorted(ids) == sorted([f"quant.yaml::{test}[smollm2-135m-rtn-w4g128-{task}]"
                                  for test in ("test_retention", "test_snapshot") for task in ("reviews", "wikitext")]
                                 + ["test_own.py::test_own"])
    result = pytester.runpytest("--co", "-q", "-p", "no:cacheprovider", "test_own.py")
    assert [line for line in result.outlines if "::" in line] == ["test_own.py::test_own"]  # explicit paths only
