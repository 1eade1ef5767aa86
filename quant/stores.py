"""The stores behind a run, each with one job and each backed by the disk cache where its work is expensive: the
run's settings (profile, devices), the baselines, the calibration set, the quantized candidates (built or loaded
through the backends) and the evaluation results (items, cached evaluation). They decide every cached number, so
this module is in the cache key; the wiring that hands their results to the gate and the snapshot is not."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quant import snapshots
from quant.backends import get_backend
from quant.backends.base import build, read_build, records_from_model
from quant.backends.checkpoint import load_checkpoint
from quant.cache import cached_dir, cached_json, code_of, has_entry
from quant.config import ConfigError, QuantConfig, file_sha256
from quant.calibration import calibration_windows, text_ids
from quant.data import LOCAL_FILES
from quant.matrix import Matrix
from quant.methods import LayerRecord
from quant.models import ModelSpec, folder_sha256, load_model, model_key
from quant.perf import PerfSettings
from quant.qlinear import dequantized_weights
from quant.kinds import kind_of
from quant.tasks import TaskResult, TaskSpec, evaluate, select_items

log = logging.getLogger("quant")

CALIBRATION_SOURCE = "wikitext"
CALIBRATION_CODE = calibration_windows.__module__  # the code of every calibrated model's key
CHECKPOINT_LOADER = load_checkpoint.__module__  # the code of a checkpoint's key: it is loaded, not built


@dataclasses.dataclass
class Quantized:
    model: torch.nn.Module
    records: list[LayerRecord]
    quantize_seconds: float | None  # None: a checkpoint made elsewhere
    calibration: str | None
    kernel: str  # what runs its quantized layers when it is evaluated
    # peak memory while quantizing, above what the process held before (the baseline, other models; on a CPU the
    # resident set's growth, a lower bound when freed pages are reused): None for a checkpoint, a build in a
    # subprocess, or a cache entry written before this was recorded
    quantize_peak_bytes: int | None = None

    def time_split(self) -> tuple[float, float, float] | None:
        """Where a calibrated build's time went, as the in-house methods log it: the Hessians, quantizing and packing
        the layers, and the rest (running the blocks over the calibration set); None for an uncalibrated one."""
        if self.quantize_seconds is None or not self.calibration:
            return None
        hessians = sum(r.hessian_seconds or 0.0 for r in self.records)
        layers = sum(r.seconds for r in self.records)
        return hessians, layers, self.quantize_seconds - hessians - layers

    def layer_counts(self) -> dict[str, int]:
        """Layers quantized, and how many of them use a fallback group size (report, snapshot and CLI)."""
        return {"quantized_layers": sum(r.bits is not None for r in self.records),
                "fallback_layers": sum(r.fallback is not None for r in self.records)}


@dataclasses.dataclass
class Rebuild:
    """Two builds of one candidate from the same inputs, tensor by tensor (every .safetensors file they wrote)."""

    tensors: int
    differing: list[str]  # names of the tensors whose bytes differ (or that only one build has)

    @property
    def identical(self) -> bool:
        return not self.differing

    def describe(self) -> str:
        if self.identical:
            return f"bit-identical ({self.tensors} tensors)"
        shown = ", ".join(self.differing[:3]) + (", ..." if len(self.differing) > 3 else "")
        return f"{len(self.differing)} of {self.tensors} tensors differ ({shown})"


def compare_builds(first: Path, second: Path) -> Rebuild:
    """Every tensor of the .safetensors files in two build folders, compared byte for byte."""
    from safetensors.torch import load_file

    tensors, differing = 0, []
    files = sorted({p.relative_to(folder) for folder in (first, second) for p in folder.rglob("*.safetensors")})
    for name in files:
        a = load_file(first / name) if (first / name).exists() else {}
        b = load_file(second / name) if (second / name).exists() else {}
        for key in sorted(set(a) | set(b)):
            tensors += 1
            if key not in a or key not in b or a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key]):
                differing.append(key)
    return Rebuild(tensors, differing)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run reads from the matrix for each model: its profile's limits and task options, and its device.
    ``device`` is where GPU-tier models run; CPU-tier models run on the CPU on every machine, so that a GPU
    runner's ``make test`` reproduces their ``cpu`` snapshots instead of moving them to CUDA."""

    matrix: Matrix
    profile: str
    data_dir: Path | None
    device: str = "cpu"
    calib_samples: int | None = None  # overrides the profile's count (``quant quantize --calib-samples``)

    def __post_init__(self) -> None:
        self.matrix.check_profile(self.profile)

    def device_for(self, spec: ModelSpec) -> str:
        return "cpu" if spec.tier == "cpu" else self.device

    def limits(self, spec: ModelSpec) -> dict[str, Any]:
        return self.matrix.limits(self.profile, spec.tier)

    def task(self, spec: ModelSpec, task_name: str) -> TaskSpec:
        """The task with the profile's option overrides (e.g. a shorter generation budget on CPU)."""
        task = self.matrix.tasks[task_name]
        overrides = self.limits(spec).get("options", {}).get(task_name, {})
        return dataclasses.replace(task, options={**task.options, **overrides})

    def calibration_config(self, spec: ModelSpec, config: QuantConfig) -> QuantConfig:
        limits = self.limits(spec)
        samples = self.calib_samples or limits.get("calib_samples", config.calib_samples)
        return dataclasses.replace(config, calib_samples=samples, calib_chunk=limits.get("calib_chunk", config.calib_chunk))

    def perf_settings(self, spec: ModelSpec) -> PerfSettings:
        return PerfSettings.from_dict(self.limits(spec).get("perf"))


class ModelStore:
    """Baselines, loaded once per process, and the WikiText-2 text as each one's token ids."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self._baselines: dict[str, tuple[torch.nn.Module, Any]] = {}
        self._wikitext: dict[str, torch.Tensor] = {}

    def baseline(self, spec: ModelSpec) -> tuple[torch.nn.Module, Any]:
        if spec.name not in self._baselines:
            self._baselines[spec.name] = load_model(spec, self.settings.device_for(spec))
        return self._baselines[spec.name]

    def wikitext_ids(self, spec: ModelSpec) -> torch.Tensor:
        """The WikiText-2 test text as one row of token ids (calibration and the timing prompt come from it)."""
        if spec.name not in self._wikitext:
            _, tokenizer = self.baseline(spec)
            source = self.settings.matrix.tasks[CALIBRATION_SOURCE]
            text = select_items(source, self.settings.data_dir, None, 0)[0]["text"]
            self._wikitext[spec.name] = text_ids(tokenizer, text)
        return self._wikitext[spec.name]


class CalibrationSet:
    """The calibration windows of a model (the second half of the WikiText-2 test text) and the text's hash."""

    def __init__(self, settings: RunSettings, models: ModelStore) -> None:
        self.settings, self.models = settings, models

    def ids(self, spec: ModelSpec, config: QuantConfig) -> torch.Tensor:
        """Calibration token ids from the second half of the WikiText-2 test text. Perplexity is measured on its
        first windows; when they would reach the second half (many windows, a dense tokenizer), the same tokens
        would be calibrated on and scored, so this refuses."""
        ids = self.models.wikitext_ids(spec)
        settings = self.settings
        windows, window = settings.limits(spec).get(CALIBRATION_SOURCE), settings.matrix.tasks[CALIBRATION_SOURCE]["window"]
        free = (len(ids) // 2) // window  # whole windows before the calibration half
        if windows is None or windows > free:
            raise ConfigError(
                f"{settings.matrix.path}: profiles.{settings.profile}.{spec.tier}.{CALIBRATION_SOURCE} = {windows} windows of "
                f"{window} tokens would reach the calibration half of the text ({len(ids)} tokens with "
                f"{spec.name}'s tokenizer): at most {free} windows keep evaluation and calibration apart")
        return calibration_windows(ids, config.calib_samples, config.calib_tokens, config.calib_seed)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The calibration text's hash, once per run: every quantized model's and quantized result's key holds it."""
        path = self.settings.data_dir / LOCAL_FILES[CALIBRATION_SOURCE] if self.settings.data_dir else None
        return file_sha256(path)[:16] if path else "hub:Salesforce/wikitext"


class CandidateStore:
    """Quantized candidates: built by their backend from the baseline (cached on disk) and loaded back, or a
    checkpoint loaded as it is; once per process each."""

    def __init__(self, settings: RunSettings, models: ModelStore, calibration: CalibrationSet) -> None:
        self.settings, self.models, self.calibration = settings, models, calibration
        self._quantized: dict[tuple[str, str], Quantized] = {}

    def get(self, spec: ModelSpec, quant_name: str, config: QuantConfig) -> Quantized:
        config = self.settings.calibration_config(spec, config)
        key = (spec.name, quant_name)
        if key not in self._quantized:
            self._quantized[key] = self._candidate(spec, config)
        return self._quantized[key]

    def _candidate(self, spec: ModelSpec, config: QuantConfig) -> Quantized:
        """The candidate a config names: built by its backend from the baseline (cached on disk) and loaded back,
        or a checkpoint folder loaded as it is."""
        if config.checkpoint:
            model, kernel = load_checkpoint(Path(config.checkpoint), self.settings.device_for(spec))
            return Quantized(model, records_from_model(model), None, None, kernel)
        backend = get_backend(config.backend)
        calibrated = backend.needs_calibration(config)
        # the forward dtype and chunking are the in-house methods' settings; a library runs its own
        calibration = (f"wikitext2 test, second half: {config.calib_samples} x {config.calib_tokens} tokens, "
                       f"seed {config.calib_seed}"
                       + ("" if config.backend else f", forward in {config.calib_dtype}"
                          f"{f', {config.calib_chunk} samples per forward' if config.calib_chunk else ''}")
                       ) if calibrated else None
        folder = cached_dir("quantized", self.parts(spec, config), self._folder_writer(spec, config))
        return self.load(spec, config, folder, calibration)

    def load(self, spec: ModelSpec, config: QuantConfig, folder: Path, calibration: str | None) -> Quantized:
        """The model a built folder holds, on this run's device for ``spec`` (a folder built on another device
        restores here: its key holds the device it was built on)."""
        records, seconds, peak = read_build(folder)
        model, kernel = get_backend(config.backend).load(self.models.baseline(spec)[0], folder, records,
                                                         self.settings.device_for(spec))
        return Quantized(model, records, seconds, calibration, kernel, peak)

    def rebuild(self, spec: ModelSpec, config: QuantConfig, load_if_different: bool = False
                ) -> tuple[Rebuild, Quantized | None]:
        """The candidate built a second time from the same inputs in an empty cache, compared tensor by tensor with
        the cached build (built first if absent); and, with ``load_if_different``, the second build loaded when it
        differs (None otherwise: loading a model to discard it is work the comparison does not need)."""
        config = self.settings.calibration_config(spec, config)
        if config.checkpoint:
            raise ConfigError(f"{config.checkpoint}: a checkpoint is not built here, so it cannot be rebuilt")
        first = cached_dir("quantized", self.parts(spec, config), self._folder_writer(spec, config))
        with tempfile.TemporaryDirectory(prefix="quant-rebuild-") as root:
            second = cached_dir("quantized", self.parts(spec, config), self._folder_writer(spec, config), root=Path(root))
            rebuild = compare_builds(first, second)
            differs = load_if_different and not rebuild.identical
            return rebuild, self.load(spec, config, second, None) if differs else None

    def _folder_writer(self, spec: ModelSpec, config: QuantConfig) -> Callable[[Path], None]:
        """What writes the config's candidate into a cache folder: its backend run on the baseline."""
        device = self.settings.device_for(spec)
        baseline, tokenizer = self.models.baseline(spec)
        backend = get_backend(config.backend)
        calibrated = backend.needs_calibration(config)

        def write(folder: Path) -> None:
            log.info("quantizing %s with %s %s (%s)", spec.name, backend.name, config.method, config.label)
            ids = self.calibration.ids(spec, config) if calibrated else None
            build(backend, baseline, tokenizer, config, ids, folder, device)

        return write

    def parts(self, spec: ModelSpec, config: QuantConfig) -> dict[str, Any]:
        """Everything a quantized model is made from: the weights and the code that loads them, the config, the
        device, the calibration text, and the code that builds it (the backend's, its method's, the calibration
        windows'), with the library that built it (name and version) for a library backend; for a checkpoint, its
        files' content and the code that loads it."""
        if config.checkpoint:
            return {"checkpoint": folder_sha256(Path(config.checkpoint)), "code": code_of(CHECKPOINT_LOADER)}
        backend = get_backend(config.backend)
        needs_data = backend.needs_calibration(config)
        return {"model": model_key(spec), "quant": config.to_dict(), "device": self.settings.device_for(spec),
                "data": self.calibration.fingerprint if needs_data else None,
                "code": code_of(*backend.code(config), CALIBRATION_CODE),
                **({"backend": backend.identity()} if config.backend else {})}


def evaluation_code(task: TaskSpec) -> tuple[str, ...]:
    """The modules whose code computes a task's records: its kind's module, the evaluation's entry
    (``quant.tasks.evaluate``) and the dequantizing context it runs in (``quant.qlinear``)."""
    return type(kind_of(task)).__module__, evaluate.__module__, dequantized_weights.__module__


FIRST_LOOK = 16  # items (windows) at a sequential gate's first look; each later look doubles them


def look_sizes(total: int) -> list[int]:
    """The item counts at which a sequential gate looks, and at whose boundaries results are cached: 16, 32, 64, ...
    and the total. A longer run's looks begin with a shorter one's, so its cached spans serve it (all but the
    shorter run's last)."""
    sizes, size = [], FIRST_LOOK
    while size < total:
        sizes.append(size)
        size *= 2
    return [*sizes, total]


def spans(sizes: list[int]) -> list[range]:
    return [range(start, stop) for start, stop in zip([0, *sizes], sizes)]


class ResultStore:
    """Evaluation results: the items each task reads and each model's result on them, cached on disk span by span
    (``look_sizes``), so that a gate can stop at a look and a longer run extends a shorter one."""

    def __init__(self, settings: RunSettings, models: ModelStore, candidates: CandidateStore) -> None:
        self.settings, self.models, self.candidates = settings, models, candidates
        self._items: dict[tuple[str, str], list[dict]] = {}
        self._item_fingerprints: dict[tuple[str, str, int, int], str] = {}

    def span_parts(self, spec: ModelSpec, task_name: str, quant_name: str | None, span: range) -> dict[str, Any]:
        """Everything the records of one span are made from: the model (the baseline's weights and loading code, or
        all a quantized model is made from), the task as this profile runs it, the span and the content of its
        items, the device, and the code that computes the records (the task's kind, with what it imports, and
        the evaluation's entry, ``quant.tasks.evaluate``)."""
        settings = self.settings
        config = None if quant_name is None else settings.calibration_config(spec, settings.matrix.quant[quant_name])
        task = settings.task(spec, task_name)
        return {"model": model_key(spec),
                "quantized": None if config is None else self.candidates.parts(spec, config),
                "task": dataclasses.asdict(task),
                "span": [span.start, span.stop], "items": self.items_fingerprint(spec, task_name, span),
                "device": settings.device_for(spec), "code": code_of(*evaluation_code(task))}

    def items(self, spec: ModelSpec, task_name: str) -> list[dict]:
        key = (spec.tier, task_name)
        if key not in self._items:
            settings = self.settings
            self._items[key] = select_items(settings.task(spec, task_name), settings.data_dir,
                                            settings.limits(spec).get(task_name), settings.matrix.seed)
        return self._items[key]

    def items_fingerprint(self, spec: ModelSpec, task_name: str, span: range | None = None) -> str:
        """The hash of the content of the items at ``span`` (None: all), once per tier, task and span."""
        items = self.items(spec, task_name)
        span = span or range(len(items))
        key = (spec.tier, task_name, span.start, span.stop)
        if key not in self._item_fingerprints:
            chosen = kind_of(self.settings.task(spec, task_name)).span_items(items, span)
            self._item_fingerprints[key] = snapshots.fingerprint(chosen)
        return self._item_fingerprints[key]

    def looks(self, spec: ModelSpec, task_name: str) -> list[int]:
        """The item counts a sequential gate looks at, the profile's n last."""
        task, limit = self.settings.task(spec, task_name), self.settings.limits(spec).get(task_name)
        size = kind_of(task).size(task, self.items(spec, task_name), limit, lambda: self.models.baseline(spec)[1])
        return look_sizes(size)

    def _spans(self, spec: ModelSpec, task_name: str, n: int | None) -> list[range]:
        sizes = self.looks(spec, task_name)
        if n is not None and n not in sizes:
            raise ValueError(f"{task_name}: results are kept at {sizes} items, not {n}")
        return spans(sizes[: sizes.index(n) + 1] if n is not None else sizes)

    def cached(self, spec: ModelSpec, task_name: str, quant_name: str | None = None, n: int | None = None) -> bool:
        """Whether the result on the first ``n`` items (None: the profile's n) is in the cache."""
        return all(has_entry("results", self.span_parts(spec, task_name, quant_name, span))
                   for span in self._spans(spec, task_name, n))

    def evaluate(self, spec: ModelSpec, task_name: str, quant_name: str | None = None, n: int | None = None
                 ) -> TaskResult:
        """The task's result for the baseline (``quant_name`` None) or a quantized model on its first ``n`` items
        (one of ``looks``; None: all the profile's), from the cache span by span, evaluating the spans it lacks."""
        task = self.settings.task(spec, task_name)
        items = self.items(spec, task_name)
        config = None if quant_name is None else self.settings.calibration_config(spec, self.settings.matrix.quant[quant_name])

        def compute(span: range) -> list[dict]:
            _, tokenizer = self.models.baseline(spec)
            model = self.models.baseline(spec)[0] if config is None else self.candidates.get(spec, quant_name, config).model
            reference = self.models.baseline(spec)[0] if config is not None and kind_of(task).uses_reference else None
            label = f"{task_name} [{spec.name} {quant_name or 'baseline'}] {span.start}-{span.stop}"
            started = time.perf_counter()
            with dequantized_weights(model):
                result = evaluate(model, tokenizer, task, items, span, label=label, reference_model=reference)
            log.info("%s: %s in %.1fs", label, result.metrics, time.perf_counter() - started)
            return result.items

        records = [record for span in self._spans(spec, task_name, n)
                   for record in cached_json("results", self.span_parts(spec, task_name, quant_name, span),
                                             lambda span=span: compute(span))]
        return kind_of(task).summarize(task, records)

    def evaluate_together(self, spec: ModelSpec, task_name: str, quant_names: list[str], n: int | None = None) -> None:
        """Cache the task's result for each of ``quant_names`` in one pass per span where that saves work: WikiText
        runs the baseline beside each model (KLD), and one baseline forward per batch serves every variant not yet
        cached, N + 1 forwards per window instead of 2N. Each result is the one ``evaluate`` gives alone (tested)."""
        task = self.settings.task(spec, task_name)
        kind = kind_of(task)
        if not kind.uses_reference:
            return
        for span in self._spans(spec, task_name, n):
            missing = [q for q in dict.fromkeys(quant_names)
                       if not has_entry("results", self.span_parts(spec, task_name, q, span))]
            if len(missing) < 2:
                continue
            baseline, tokenizer = self.models.baseline(spec)
            models = [self.candidates.get(spec, q, self.settings.matrix.quant[q]).model for q in missing]
            started = time.perf_counter()
            with contextlib.ExitStack() as stack:
                for model in models:
                    stack.enter_context(dequantized_weights(model))
                results = kind.evaluate_models(
                    models, tokenizer, task, kind.span_items(self.items(spec, task_name), span), span,
                    f"{task_name} [{spec.name} {len(models)} variants] {span.start}-{span.stop}", reference_model=baseline)
            log.info("%s [%s %s] %d-%d: in %.1fs", task_name, spec.name, ", ".join(missing), span.start, span.stop,
                     time.perf_counter() - started)
            # the baseline's own result came from the same forwards: the last of the list
            for quant_name, result in zip([*missing, None], results):
                cached_json("results", self.span_parts(spec, task_name, quant_name, span), lambda r=result: r.items)
