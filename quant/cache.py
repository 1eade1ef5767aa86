"""On-disk cache of expensive results (quantized models, evaluation records), each keyed by a hash of
what decides its content: its inputs, the code that makes it (``code_of``) and the libraries' versions. Safe when
several processes (pytest-xdist workers) want the same entry:
one builds it under a file lock while the others wait, and an entry appears only complete, by an atomic
rename of a finished temporary folder, so an interrupted build leaves nothing behind that is read."""
from __future__ import annotations

import ast
import copy
import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from quant.config import file_sha256
from quant.project import cache_dir

log = logging.getLogger("quant")

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = "quant"
# The libraries whose versions can change a number: kernels, tokenizers, GGUF dequantization, file formats.
RESULT_LIBRARIES = ("torch", "transformers", "tokenizers", "gguf", "safetensors", "numpy")
# Where artifacts are kept and how warnings are silenced, not what they hold: no artifact's code (their own keys'
# structure is the cache's, and the cache's tests hold it).
STORAGE = ("quant", "quant.cache", "quant.project", "quant.quiet")
MANIFEST = "key.json"  # written last: its presence marks a complete entry, and it holds each payload file's hash


def module_path(module: str, package_dir: Path) -> Path:
    """The file of a module of this package (``quant.kinds.choice`` -> ``<package_dir>/kinds/choice.py``)."""
    relative = Path(*module.split(".")[1:])
    folder = package_dir / relative
    return folder / "__init__.py" if folder.is_dir() else package_dir / relative.with_suffix(".py")


def _imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """The modules of this package that ``module``'s code imports. A package's ``__init__`` importing its own
    submodules is a registry (every method, every kind): those are not code that any one entry runs."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from quant import data`
    own = [name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]
    return {name for name in own if not (is_package and name.startswith(module + "."))}


def _code(tree: ast.AST) -> str:
    """Code without its docstrings, comments or layout: rewording an explanation rebuilds nothing."""
    tree = copy.deepcopy(tree)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            body[0] = ast.Pass()
    return ast.dump(tree)


@functools.lru_cache(maxsize=None)
def _module_code(path: Path, _mtime_ns: int, _size: int, module: str) -> tuple[str, set[str]]:
    """A module file's code hash and the package's modules it imports, parsed once per content it has."""
    tree = ast.parse(path.read_text())
    return hashlib.sha256(_code(tree).encode()).hexdigest()[:16], _imported(tree, module, path.name == "__init__.py")


@functools.lru_cache(maxsize=None)
def code_closure(entries: tuple[str, ...], package_dir: Path) -> dict[str, str]:
    """The code of the ``entries`` modules and of every module of this package they import, transitively, by file
    (relative to the package) -> the hash of its code. Modules that exist only in another package copy are left
    out (an import guarded for an optional library names no file here). Read once per process: a key names the
    code the process runs, not an edit made while it runs."""
    codes, pending = {}, list(entries)
    while pending:
        module = pending.pop()
        path = module_path(module, package_dir)
        name = path.relative_to(package_dir).as_posix()
        if name in codes or not path.is_file():
            continue
        stat = path.stat()
        codes[name], imported = _module_code(path, stat.st_mtime_ns, stat.st_size, module)
        pending += [name for name in imported if name not in STORAGE]
    return dict(sorted(codes.items()))


def code_of(*entries: str) -> str:
    """The hash of the code an artifact is made by: the modules named (``quant.methods.gptq``) and what they import
    from this package. Every artifact's key holds it for its own entries, so an edit rebuilds only what that code
    makes (a task prompt no quantized model; a method's file the models built with it)."""
    closure = code_closure(tuple(sorted(set(entries))), PACKAGE_DIR)
    return hashlib.sha256(json.dumps(closure).encode()).hexdigest()[:16]


def definition_code(*definitions: Callable | type) -> str:
    """The hash of the code of single functions or classes, for an artifact made by one definition of a module
    whose other code makes nothing cached (a compiled prompt's ``PromptForward``, a layer's sensitivity)."""
    codes = [_code(ast.parse(textwrap.dedent(inspect.getsource(definition)))) for definition in definitions]
    return hashlib.sha256("\n".join(codes).encode()).hexdigest()[:16]


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
    """What a key hashes: the caller's parts (its inputs and ``code_of`` its code) and the library versions."""
    return {**parts, "libraries": library_versions()}


def key_of(parts: dict[str, Any]) -> str:
    """A stable hash of JSON-serialisable key parts (the library versions are always among them)."""
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
