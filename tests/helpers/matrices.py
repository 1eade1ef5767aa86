"""This repository's matrix as data, and a matrix written from data into a test's folder."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.repo import MATRIX_FILE


def repo_matrix() -> dict[str, Any]:
    """This repository's matrix.yaml, parsed (a fresh copy each call: edit it freely)."""
    return yaml.safe_load(MATRIX_FILE.read_text())


def write_matrix(folder: Path, raw: dict[str, Any]) -> Path:
    """``raw`` written as ``folder/matrix.yaml``."""
    path = folder / "matrix.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def edited_matrix(folder: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """This repository's matrix with ``edit`` applied to its data, written into ``folder``."""
    raw = repo_matrix()
    edit(raw)
    return write_matrix(folder, raw)
