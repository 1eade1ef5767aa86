"""The CI workflows are valid GitHub Actions (schema check, offline) and call what this repository defines."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quant.cli import build_parser
from tests.helpers.repo import REPO_ROOT

WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))


def test_workflows_pass_the_github_workflow_schema():
    checker = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert checker, "check-jsonschema is a test dependency (pip install -e '.[test]')"
    result = subprocess.run([checker, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_call_existing_make_targets_and_commands(workflow):
    text = workflow.read_text()
    targets = set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))
    for target in re.findall(r"\bmake ([\w-]+)", text):
        assert target in targets, f"{workflow.name}: make {target} is not a Makefile target"
    for line in re.findall(r"-m quant ([^`\n]+)", text):  # each command line as the CLI parses it, flags included
        try:
            build_parser().parse_args(shlex.split(line))
        except SystemExit:
            pytest.fail(f"{workflow.name}: quant {line}: not a command line quant accepts (stderr above)")
