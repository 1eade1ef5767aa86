"""The user's project: the folder that holds its matrix, reports, snapshot baselines and benchmark history, and the
user's cache folder. A project is the folder pytest (its rootdir) or ``quant`` runs in, or, for ``quant``, the
nearest folder above whose ``pyproject.toml`` has a ``[tool.quant]`` table. No path is resolved from the installed
package's folder, so nothing is ever written into it."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from quant.config import ConfigError

MATRIX_ENV = "QUANT_MATRIX"
CACHE_DIR_ENV = "QUANT_CACHE_DIR"
BASELINES_ENV = "QUANT_BASELINES"
PYPROJECT = "pyproject.toml"
SETTINGS = {"matrix": "the matrix file, relative to the project", "baselines": "the snapshot baselines folder"}


@dataclasses.dataclass(frozen=True)
class Project:
    root: Path
    settings: dict[str, Any]  # the [tool.quant] table of root/pyproject.toml ({} when there is none)

    @classmethod
    def at(cls, root: Path) -> Project:
        """The project whose root is ``root`` (pytest's rootdir)."""
        root = Path(root).resolve()
        return cls(root, tool_quant_table(root / PYPROJECT))

    @classmethod
    def find(cls, start: Path | None = None) -> Project:
        """The nearest folder from ``start`` (the working folder) upwards whose pyproject.toml has [tool.quant];
        ``start`` itself when none has."""
        start = Path(start or Path.cwd()).resolve()
        for folder in (start, *start.parents):
            if (folder / PYPROJECT).is_file() and tool_quant_table(folder / PYPROJECT):
                return cls.at(folder)
        return cls.at(start)

    def matrix(self, explicit: str | os.PathLike | None = None) -> Path | None:
        """The matrix file: ``--matrix``, else ``$QUANT_MATRIX``, else ``[tool.quant] matrix``; None when none
        is configured."""
        if explicit:
            return Path(explicit)
        if os.environ.get(MATRIX_ENV):
            return Path(os.environ[MATRIX_ENV])
        if "matrix" in self.settings:
            return self.root / self.settings["matrix"]
        return None

    def where_matrix_is_looked_for(self) -> str:
        return f"--matrix, ${MATRIX_ENV} and [tool.quant] matrix in {self.root / PYPROJECT}"

    def require_matrix(self, explicit: str | os.PathLike | None = None) -> Path:
        """The configured matrix file, or a ConfigError that says where it looked and how to configure one."""
        path = self.matrix(explicit)
        if path is None:
            raise ConfigError(f"no matrix found: looked at {self.where_matrix_is_looked_for()}; write one with "
                              "`quant init`, or pass --matrix PATH")
        if path.is_dir():
            raise ConfigError(f"{path}: the matrix must be a YAML file, not a folder")
        return path

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def baselines(self) -> Path:
        """Snapshot baselines, ``<hardware>/<profile>/<file>.json``: ``$QUANT_BASELINES``, else ``[tool.quant]
        baselines``, else ``baselines/`` in the project."""
        chosen = os.environ.get(BASELINES_ENV) or self.root / self.settings.get("baselines", "baselines")
        return Path(chosen).resolve()

    @property
    def benchmarks(self) -> Path:
        """pytest-benchmark's storage (its own default, ``.benchmarks`` in the folder pytest runs in)."""
        return self.root / ".benchmarks"


def tool_quant_table(path: Path) -> dict[str, Any]:
    """The [tool.quant] table of a pyproject.toml, checked: a ConfigError names the file and the field."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {}).get("quant", {})
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    unknown = sorted(set(table) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"{path}: [tool.quant] has unknown field(s) {unknown}; known: "
                          + "; ".join(f"{name} ({what})" for name, what in SETTINGS.items()))
    for name, value in table.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: [tool.quant] {name} = {value!r}: must be a path in quotes")
    return table


def current() -> Project:
    """The project of the working folder (the command line's, and library code's default)."""
    return Project.find()


def cache_dir() -> Path:
    """Root of the on-disk cache of quantized models and evaluation results: ``$QUANT_CACHE_DIR``, else the user's
    cache folder (``$XDG_CACHE_HOME/quant``, else ``~/.cache/quant``). A path that cannot hold the cache is a
    ConfigError naming the variable."""
    if os.environ.get(CACHE_DIR_ENV):
        where, path = f"${CACHE_DIR_ENV}", Path(os.environ[CACHE_DIR_ENV])
    else:
        where = "$XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "~/.cache"
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quant"
    path = path.expanduser().resolve()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())  # what mkdir would start from
    if not existing.is_dir():
        raise ConfigError(f"{where} points at {path}, " + ("which" if existing == path else f"and {existing}")
                          + " is a file: the cache needs a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} points at {path}, and {existing} cannot be written by this user: name a folder "
                          f"it can write ({CACHE_DIR_ENV})")
    return path
