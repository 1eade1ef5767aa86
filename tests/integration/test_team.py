"""The package as a team uses it in its own repository (examples/team/): built as a wheel, installed with
``pip install --no-deps --target`` into a temporary folder, and run in a copy of the team folder, which holds only
its pyproject.toml, its matrix and one task of its own. pytest collects and runs the matrix's cases through the
plugin's entry point, --record-baselines writes the team's baselines/, ``quant report`` its reports/, and nothing
is written under the installed package or this checkout."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.repo import REPO_ROOT

TEAM = REPO_ROOT / "examples" / "team"


def _listing(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (outside the top-level folders ``skip``) with its size and modification time."""
    return {path.relative_to(root).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*") if path.is_file() and path.relative_to(root).parts[0] not in skip}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """This checkout's wheel, built from a copy of its sources (a build writes build/ beside them), installed with
    pip's --target into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "quant", source / "quant", ignore=shutil.ignore_patterns("__pycache__"))
    quiet = {"check": True, "capture_output": True, "text": True, "timeout": 300}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
                    str(source)], **quiet)
    wheel, = (root / "dist").glob("quant_suite-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                    str(root / "site"), str(wheel)], **quiet)
    return root / "site"


def test_a_team_runs_its_matrix_and_its_own_task_from_the_installed_wheel(installed, tmp_path, shared_data):
    team = tmp_path / "team"
    shutil.copytree(TEAM, team, ignore=shutil.ignore_patterns("baselines", "reports", ".pytest_cache"))
    # The wheel first on the path; no bytecode written anywhere, so that any file under it is one the suite wrote.
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONDONTWRITEBYTECODE": "1",
           "QUANT_CACHE_DIR": str(tmp_path / "cache"), "QUANT_DATA_DIR": str(shared_data)}
    for name in ("QUANT_MATRIX", "QUANT_BASELINES", "QUANT_PROFILE"):
        env.pop(name, None)
    package_before, checkout_before = _listing(installed), _listing(REPO_ROOT, skip=(".git", ".venv", ".cache"))

    where = subprocess.run([sys.executable, "-c", "import quant; print(quant.__file__)"], cwd=team, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(installed), where
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "-p", "no:cacheprovider",
                          "--record-baselines"], cwd=team, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "4 passed" in run.stdout, run.stdout[-2000:]  # two cases (reviews, wikitext) x two tests
    assert f"rootdir: {team}" in run.stdout
    for case in ("smollm2-135m-rtn-w4g128-reviews", "smollm2-135m-rtn-w4g128-wikitext"):
        assert f"recorded test_snapshot[{case}] in {team / 'baselines' / 'cpu' / 'test' / 'test_matrix.json'}" \
            in run.stdout, run.stdout[-2000:]
    report = subprocess.run([sys.executable, "-m", "quant", "report", "--profile", "test"], cwd=team, env=env,
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (team / "reports" / "latest.json").is_file() and (team / "reports" / "latest.md").is_file()
    assert "| rtn-w4g128 |" in (team / "reports" / "latest.md").read_text()

    assert _listing(installed) == package_before
    assert _listing(REPO_ROOT, skip=(".git", ".venv", ".cache")) == checkout_before
