"""What ``quant init`` writes into a team's repository: a starting matrix (``quant.yaml``, with the schema line
editors read), the ``[tool.quant]`` table that names it in ``pyproject.toml``, and a GPU workflow to commit. Nothing
that exists is overwritten: any conflict is named and nothing is written."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from quant.config import ConfigError
from quant.project import PYPROJECT, tool_quant_table

TEMPLATES = Path(__file__).resolve().parent / "templates"  # read-only package data
SCHEMA = Path(__file__).resolve().parent / "matrix.schema.json"
MATRIX, WORKFLOW = Path("quant.yaml"), Path(".github/workflows/quant-gpu.yml")
TOOL_TABLE = f'\n[tool.quant]\nmatrix = "{MATRIX}"  # the regression matrix pytest and quant read\n'


def init_project(root: Path) -> list[Path]:
    """Write the starting files into ``root``; the paths written. A ConfigError names every file that exists."""
    pyproject = root / PYPROJECT
    conflicts = [str(root / path) for path in (MATRIX, WORKFLOW) if (root / path).exists()]
    if pyproject.is_file() and tool_quant_table(pyproject):
        conflicts.append(f"{pyproject} (it has a [tool.quant] table)")
    if conflicts:
        raise ConfigError(f"quant init overwrites nothing, and these exist: {'; '.join(conflicts)}")
    version = importlib.metadata.version("quant-suite")
    (root / MATRIX).write_text((TEMPLATES / "quant.yaml").read_text().replace("{schema}", SCHEMA.as_uri()))
    (root / WORKFLOW).parent.mkdir(parents=True, exist_ok=True)
    (root / WORKFLOW).write_text((TEMPLATES / "quant-gpu.yml").read_text().replace("{version}", version))
    existing = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
    pyproject.write_text(existing.rstrip("\n") + "\n" + TOOL_TABLE if existing else TOOL_TABLE.lstrip("\n"))
    return [root / MATRIX, pyproject, root / WORKFLOW]
