"""On-disk cache of expensive results (quantized models, evaluation records), keyed by a hash of
everything that produced them. Safe when several processes (pytest-xdist workers) want the same entry:
one builds it under a file lock while the others wait, and an entry appears only complete, by an atomic
rename of a finished temporary folder, so an interrupted build leaves nothing behind that is read."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from quant.config import cache_dir

log = logging.getLogger("quant")

PACKAGE_DIR = Path(__file__).resolve().parent


# The modules whose code decides what a quantized model or an evaluation result contains. Reporting,
# statistics and orchestration are left out: changing them must not throw away hours of cached work.
RESULT_MODULES = ("config.py", "models.py", "qlinear.py", "data.py", "tasks.py", "tasks.yaml", "methods")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the source that produces cached results: any change to it invalidates every entry."""
    digest = hashlib.sha256()
    for name in RESULT_MODULES:
        module = PACKAGE_DIR / name
        for path in sorted(module.glob("*.py")) if module.is_dir() else [module]:
            digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def key_of(parts: dict[str, Any]) -> str:
    """A stable hash of JSON-serialisable key parts (the code version is always one of them)."""
    payload = json.dumps({**parts, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_dir(kind: str, parts: dict[str, Any], build: Callable[[Path], None], root: Path | None = None) -> Path:
    """The folder of the entry for ``parts``, calling ``build(tmp_folder)`` to make it if absent."""
    root = (root or cache_dir()) / kind
    root.mkdir(parents=True, exist_ok=True)
    key = key_of(parts)
    final = root / key
    if (final / "key.json").is_file():
        return final
    with FileLock(str(final) + ".lock"):
        if (final / "key.json").is_file():  # another process built it while we waited
            return final
        if final.exists():  # a stray folder without its key file is not an entry
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".tmp", dir=root))
        try:
            build(tmp)
            (tmp / "key.json").write_text(json.dumps({**parts, "code": code_version()}, indent=1, default=str))
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
