"""On-disk cache of expensive results (quantized models, evaluation records), keyed by a hash of
everything that produced them. Safe when several processes (pytest-xdist workers) want the same entry:
one builds it under a file lock while the others wait, and an entry appears only complete, by an atomic
rename of a finished temporary folder, so an interrupted build leaves nothing behind that is read."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from quant.config import file_sha256
from quant.project import cache_dir

log = logging.getLogger("quant")

PACKAGE_DIR = Path(__file__).resolve().parent


# The modules whose code decides what a quantized model or an evaluation result contains: quantization (methods,
# and the backends that run them or a library), the loaders, tasks and task kinds, the metrics they compute
# (metrics), the stores that select items and calibration windows and run the evaluations (stores), and the memory
# reading a build records (memory). The wiring (pipeline), the gate (gate, stats), timing (perf, compiled, kernels),
# snapshots and reporting are left out: changing how a verdict is reached or shown must not throw away hours of
# cached work.
RESULT_MODULES = ("config.py", "models.py", "qlinear.py", "data.py", "tasks.py", "tasks.yaml", "kinds", "metrics.py",
                  "stores.py", "memory.py", "methods", "backends")
# The libraries whose versions can change a number: kernels, tokenizers, GGUF dequantization, file formats.
RESULT_LIBRARIES = ("torch", "transformers", "tokenizers", "gguf", "safetensors", "numpy")
MANIFEST = "key.json"  # written last: its presence marks a complete entry, and it holds each payload file's hash


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the source that produces cached results: any change to it invalidates every entry."""
    return source_hash(PACKAGE_DIR)


def source_hash(package_dir: Path) -> str:
    """Hash of the RESULT_MODULES of the package at ``package_dir``."""
    digest = hashlib.sha256()
    for name in RESULT_MODULES:
        module = package_dir / name
        for path in sorted(module.glob("*.py")) if module.is_dir() else [module]:
            digest.update(path.relative_to(package_dir).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str | None]:
    """The installed version of each library in RESULT_LIBRARIES (None: not installed)."""
    versions = {}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def key_parts(parts: dict[str, Any]) -> dict[str, Any]:
    """What a key hashes: the caller's parts, the code version and the library versions."""
    return {**parts, "code": code_version(), "libraries": library_versions()}


def key_of(parts: dict[str, Any]) -> str:
    """A stable hash of JSON-serialisable key parts (code and library versions are always among them)."""
    payload = json.dumps(key_parts(parts), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _payload(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): file_sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def _intact(folder: Path) -> bool:
    """An entry is complete and unaltered: its manifest exists and every payload file still has its hash."""
    try:
        if _payload(folder) == json.loads((folder / MANIFEST).read_text()).get("payload"):
            return True
    except (OSError, ValueError, AttributeError):  # unreadable, cut off, or not a JSON object
        pass
    log.warning("cache entry %s does not match its recorded checksums (truncated, altered or its manifest "
                "unreadable): rebuilding it", folder)
    return False


def _complete(folder: Path) -> bool:
    """An entry whose manifest was written (its build finished) and whose payload is intact."""
    return (folder / MANIFEST).is_file() and _intact(folder)


def has_entry(kind: str, parts: dict[str, Any], root: Path | None = None) -> bool:
    """Whether a complete, unaltered entry for ``parts`` exists (nothing is built)."""
    return _complete((root or cache_dir()) / kind / key_of(parts))


def cached_dir(kind: str, parts: dict[str, Any], build: Callable[[Path], None], root: Path | None = None) -> Path:
    """The folder of the entry for ``parts``, calling ``build(tmp_folder)`` to make it if absent or damaged."""
    root = (root or cache_dir()) / kind
    root.mkdir(parents=True, exist_ok=True)
    key = key_of(parts)
    final = root / key
    if _complete(final):
        return final
    with FileLock(str(final) + ".lock"):
        if _complete(final):  # another process built it while we waited
            return final
        if final.exists():  # a damaged entry, or a stray folder without its manifest, is not an entry
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".tmp", dir=root))
        try:
            build(tmp)
            manifest = {**key_parts(parts), "payload": _payload(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("cached %s/%s", kind, key)
    return final


def cached_json(kind: str, parts: dict[str, Any], compute: Callable[[], Any], root: Path | None = None) -> Any:
    """A JSON-serialisable result, computed once per key."""
    def build(folder: Path) -> None:
        (folder / "value.json").write_text(json.dumps(compute()))

    return json.loads((cached_dir(kind, parts, build, root) / "value.json").read_text())
