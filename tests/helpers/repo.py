"""This repository's own files, as its tests read them (the package resolves no path from its folder; its tests may)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MATRIX_FILE = REPO_ROOT / "matrix.yaml"  # this repository's matrix ([tool.quant] matrix in pyproject.toml)
BASELINES = REPO_ROOT / "baselines"
