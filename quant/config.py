"""Configuration: quantization configs, YAML files read with errors that name them, and the evaluation data folder."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import yaml

TASKS_FILE = Path(__file__).resolve().parent / "tasks.yaml"  # the built-in tasks, read-only package data

DATA_DIR_ENV = "QUANT_DATA_DIR"


class UserError(Exception):
    """What a user can fix: its message is one line naming the file, field, variable or flag (``quant`` prints it
    with exit status 2, pytest as a usage error)."""


class ConfigError(UserError, ValueError):
    """A configuration value the user can fix; the message names the field."""


class DataError(UserError, ValueError):
    """A data file or row the user can fix; the message names file, line and field."""


def file_sha256(path: Path) -> str:
    """A file's content hash (model weights and data files in cache keys; cache payloads in their manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CALIB_DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names
# Fields whose YAML value could be of the wrong kind unnoticed ("yes" for a bool, 4.5 bits, true for a number).
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "method": ((str,), "a method name"), "bits": ((int,), "an integer"), "group_size": ((int,), "an integer"),
    "sym": ((bool,), "true or false"), "act_order": ((bool,), "true or false"),
    "clip_search": ((bool,), "true or false"), "explicit_scales": ((bool,), "true or false"),
    "damp_percent": ((int, float), "a number"),
    "calib_chunk": ((int,), "an integer"), "calib_samples": ((int,), "an integer"),
    "calib_tokens": ((int,), "an integer"),
    "lm_head_bits": ((int,), "an integer"), "lm_head_group_size": ((int,), "an integer"),
    "backend": ((str,), "a backend name"), "checkpoint": ((str,), "a folder"),
}
NULLABLE_FIELDS = ("group_size", "calib_chunk", "lm_head_bits", "lm_head_group_size", "backend", "checkpoint")
# Fields added after configs were cached and snapshotted: left out of to_dict() at their default (None), so an
# existing config keeps its identity (cache keys, snapshot fingerprints).
LATER_FIELDS = ("lm_head_bits", "lm_head_group_size", "backend", "checkpoint")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize the linears of a model's decoder blocks (and, when asked, its output projection).

    ``group_size`` None means one group per output channel (per-channel). ``layer_overrides`` maps a
    substring of a layer name (e.g. ``down_proj``) to field overrides, or to ``"skip"`` to keep that
    layer in full precision.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    # GPTQ (Frantar et al. 2023)
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    # dtype of the matmuls in the forward that carries calibration activations from block to block
    # (torch.autocast); weights, Hessians and the column loop stay float32 (see GPTQQuantizer)
    calib_dtype: str = "float32"
    # GSQ / AWQ (Lin et al. 2024)
    alpha_grid: int = 20
    clip_search: bool = False
    # A scaling group whose 1/s cannot fold into the layer before it (v -> o under grouped-query attention): AWQ
    # leaves it unscaled (the default); true scales it with an explicit fp16 input scale (label suffix "-xs"),
    # which AWQ-format kernels cannot load.
    explicit_scales: bool = False
    search_tokens: int = 2048  # calibration tokens (seeded sample) scored per alpha / clip candidate
    # Calibration: samples x tokens drawn from the WikiText-2 test text outside the evaluation windows.
    calib_samples: int = 128
    calib_tokens: int = 512
    calib_seed: int = 0
    # Calibration samples per forward of a block (None: all at once). Bounds the peak memory of a block's
    # activations. The statistics sum sample by sample, so chunks change no sum's order; a block forward over fewer
    # rows may still round differently on some kernels, so codes are equal up to rounding ties (tests/helpers/rounding.py).
    calib_chunk: int | None = None
    layer_overrides: tuple[tuple[str, Any], ...] = ()
    # The output projection stays in full precision unless lm_head_bits is set: then RTN puts it on its own grid
    # (llama.cpp keeps the output matrix at 6-8 bits), untied from the input embeddings, which stay as they are.
    lm_head_bits: int | None = None
    lm_head_group_size: int | None = None  # None: per-channel
    # Who builds the model (quant.backends): None is the in-house method; "gptqmodel" and the other libraries
    # quantize the same baseline with the same calibration windows.
    backend: str | None = None
    # A quantized checkpoint folder made elsewhere: nothing is built, it is loaded and judged against the
    # case's model as its base (method "checkpoint"; the other fields do not apply).
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        for name, (kinds, what) in FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None and name in NULLABLE_FIELDS:
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ConfigError(f"{name}={value!r}: must be {what}")
        for name in ("bits", "lm_head_bits"):
            if getattr(self, name) is not None and not 2 <= getattr(self, name) <= 8:
                raise ConfigError(f"{name}={getattr(self, name)}: supported bit widths are 2..8")
        # smaller groups are not a layout any kernel or the fallback (which stops at 16) produces
        for name in ("group_size", "lm_head_group_size"):
            size = getattr(self, name)
            if size is not None and (size < 16 or size % 2):
                raise ConfigError(f"{name}={size}: use an even group size >= 16, or null for per-channel")
        if self.lm_head_group_size is not None and self.lm_head_bits is None:
            raise ConfigError(f"lm_head_group_size={self.lm_head_group_size} needs lm_head_bits")
        if self.checkpoint and self.backend:
            raise ConfigError(f"checkpoint={self.checkpoint!r} is loaded, not built: leave out backend={self.backend!r}")
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent={self.damp_percent}: must lie in (0, 1)")
        if self.calib_chunk is not None and self.calib_chunk < 1:
            raise ConfigError(f"calib_chunk={self.calib_chunk}: use a positive number of samples, or null for all at once")
        if self.calib_dtype not in CALIB_DTYPES:
            raise ConfigError(f"calib_dtype={self.calib_dtype!r}: use one of {', '.join(CALIB_DTYPES)}")
        if self.calib_dtype != "float32" and self.method != "gptq":
            # GSQ's scale search compares block outputs that differ by less than bf16 resolves
            raise ConfigError(f"calib_dtype={self.calib_dtype!r} applies to gptq only, not {self.method}")

    @property
    def label(self) -> str:
        """Short name such as ``w4g128-sym``, ``w8-asym`` (per-channel) or ``w4g128-sym-xs`` (explicit scales),
        after the library that builds it (``gptqmodel w4g64-sym``); a checkpoint is named by its folder."""
        if self.checkpoint:
            return f"checkpoint {Path(self.checkpoint).name}"
        group = f"g{self.group_size}" if self.group_size else ""
        head = (f"-head{self.lm_head_bits}" + (f"g{self.lm_head_group_size}" if self.lm_head_group_size else "")
                if self.lm_head_bits else "")
        backend = f"{self.backend} " if self.backend else ""
        return f"{backend}w{self.bits}{group}-{'sym' if self.sym else 'asym'}{'-xs' if self.explicit_scales else ''}{head}"

    def for_layer(self, layer_name: str) -> QuantConfig | None:
        """The config that applies to one layer, or None when that layer stays in full precision."""
        config = self
        for pattern, override in self.layer_overrides:
            if pattern in layer_name:
                if override == "skip":
                    return None
                config = dataclasses.replace(config, **dict(override), layer_overrides=())
        return config

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {key: value for key, value in data.items() if not (key in LATER_FIELDS and value is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "quant config") -> QuantConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
        data = dict(data)
        if data.get("checkpoint"):
            data.setdefault("method", "checkpoint")
        overrides = data.pop("layer_overrides", {}) or {}
        if isinstance(overrides, dict):
            overrides = tuple((k, v if v == "skip" else tuple(sorted(v.items()))) for k, v in overrides.items())
        try:
            return cls(**data, layer_overrides=tuple(overrides))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"{line}: {key!r} is written twice (first on line {first}); YAML would keep the second "
                         "silently: remove one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # its own keys: a merged mapping's (<<: *anchor) may be overridden here
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's content; one ConfigError naming the file (and line) when it is missing, a folder, not YAML, or
    names a key twice."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as error:
        raise ConfigError(f"{path}:{error}") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, where a YAML file is expected") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def check_profile(profiles: dict[str, Any], profile: str, path: Path, option: str = "--profile") -> None:
    """Refuse a profile the matrix at ``path`` (its ``profiles``) does not define, naming the option that chose it."""
    if profile not in profiles:
        raise ConfigError(f"{option} {profile}: {path} has no such profile; its profiles: {', '.join(sorted(profiles))}")


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local evaluation-data folder (``--data-dir`` or ``QUANT_DATA_DIR``), or None to use the hub."""
    value = explicit or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{DATA_DIR_ENV}/--data-dir points at {path}, which is not a folder")
    return path
