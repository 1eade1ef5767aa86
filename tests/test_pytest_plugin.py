"""The pytest plugin (quant/pytest_plugin.py), run in a scratch project: the joint verdict at the end of a run and
the merge gate's summary file; and the rule that it is the package's only module importing pytest."""
import ast
from pathlib import Path

from tests.repo import REPO_ROOT

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
