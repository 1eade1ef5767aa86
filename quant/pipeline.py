"""The wiring behind a regression case: the stores (quant/stores.py: settings, baselines, calibration set,
candidates, results) built once per process, their results handed to the gate (quant/gate.py) and the snapshot
(quant/snapshots.py), and each model as it would be served for timing."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from quant import gate, snapshots
from quant.kernels import cast_parameters, use_fast_kernels
from quant.matrix import Case, Matrix
from quant.models import ModelSpec
from quant.perf import dtype_name
from quant.config import QuantConfig
from quant.qlinear import QuantLinear, dequantized_weights, model_bytes
from quant.stores import (CALIBRATION_SOURCE, CalibrationSet, CandidateStore, ModelStore, Quantized, Rebuild,
                          ResultStore, RunSettings)
from quant.tasks import TaskResult, evaluate

__all__ = ["CALIBRATION_SOURCE", "Quantized", "Workbench"]


class Workbench:
    """One run's stores, wired together, and what a case asks of them. Each store method is reachable here under
    its old name, so that a case reads ``workbench.evaluate(...)`` whichever store answers."""

    def __init__(
        self, matrix: Matrix, profile: str, data_dir: Path | None, device: str = "cpu", calib_samples: int | None = None
    ) -> None:
        self.settings = RunSettings(matrix, profile, data_dir, device, calib_samples)
        self.models = ModelStore(self.settings)
        self.calibration_set = CalibrationSet(self.settings, self.models)
        self.candidates = CandidateStore(self.settings, self.models, self.calibration_set)
        self.results = ResultStore(self.settings, self.models, self.candidates)
        settings = self.settings
        self.device_for, self.limits, self.task = settings.device_for, settings.limits, settings.task
        self.calibration_config, self.perf_settings = settings.calibration_config, settings.perf_settings
        self.baseline, self.wikitext_ids = self.models.baseline, self.models.wikitext_ids
        self.calibration = self.calibration_set.ids
        self.quantized, self.quantized_parts = self.candidates.get, self.candidates.parts
        self.items, self.items_fingerprint = self.results.items, self.results.items_fingerprint
        self.evaluate, self.evaluate_together = self.results.evaluate, self.results.evaluate_together

    def runnable(self, spec: ModelSpec, quant_name: str | None, dtype: torch.dtype | None = None
                 ) -> tuple[torch.nn.Module, str]:
        """The model as it would be served, and the kernel that runs it: the baseline (optionally cast to
        ``dtype``), or a quantized model with its packed layers on the fastest kernel this device has."""
        baseline, _ = self.baseline(spec)
        if quant_name is None:
            model = baseline if dtype in (None, baseline.dtype) else cast_parameters(copy.deepcopy(baseline), dtype)
            return model, f"dense {dtype_name(model.dtype)} (torch.nn.functional.linear)"
        quantized = self.quantized(spec, quant_name, self.settings.matrix.quant[quant_name])
        if not any(isinstance(module, QuantLinear) for module in quantized.model.modules()):
            return quantized.model, quantized.kernel  # a library's model already runs on the kernel it picked
        model = copy.deepcopy(quantized.model)
        return model, use_fast_kernels(model).describe()

    def rebuilt(self, spec: ModelSpec, quant_name: str, config: QuantConfig) -> tuple[Rebuild, dict[str, float]]:
        """The candidate built again in an empty cache and compared tensor by tensor with the cached build; when
        they differ, the WikiText perplexity of each on the profile's windows (``cached build``, ``rebuild``)."""
        rebuild, second = self.candidates.rebuild(spec, config, load_if_different=True)
        if rebuild.identical:
            return rebuild, {}
        task = self.task(spec, CALIBRATION_SOURCE)
        items, limit = self.items(spec, task.name), self.limits(spec).get(task.name)
        _, tokenizer = self.baseline(spec)
        perplexities = {}
        for label, quantized in (("cached build", self.quantized(spec, quant_name, config)), ("rebuild", second)):
            with dequantized_weights(quantized.model):
                perplexities[label] = evaluate(quantized.model, tokenizer, task, items, range(limit)).metrics["perplexity"]
        return rebuild, perplexities

    def compare(self, case: Case, metric: str | None = None, n: int | None = None) -> gate.Comparison:
        """Quantized vs baseline on the same first ``n`` items (None: the profile's n), with the paired statistics
        and the fixed gate's verdict."""
        baseline = self.evaluate(case.model, case.task.name, n=n)
        quantized = self.evaluate(case.model, case.task.name, case.quant_name, n=n)
        return gate.judge(case, baseline, quantized, metric)

    def looks(self, case: Case) -> list[int]:
        """The item counts the case's gate looks at: ``ResultStore.looks``, or the profile's n alone for a case
        with ``sequential: false``."""
        sizes = self.results.looks(case.model, case.task.name)
        return sizes if case.gate["sequential"] else sizes[-1:]

    def settle_look(self, case: Case, look: int) -> gate.Comparison | None:
        """The case's headline gate at ``look`` (from 0): decided there (``gate.settle``), or None to go on."""
        sizes = self.looks(case)
        return gate.settle(self.compare(case, n=sizes[look]), sizes, look)

    def settle(self, case: Case) -> gate.Comparison:
        """The case's headline gate, evaluated span by span until a look decides it (at the latest, the last)."""
        looks = (self.settle_look(case, look) for look in range(len(self.looks(case))))
        return next(settled for settled in looks if settled is not None)  # the last look always decides

    def snapshot(self, case: Case, candidate: TaskResult | None = None) -> dict[str, Any]:
        """What ``baselines/`` records for a case (``snapshots.snapshot_of``): both results, from the cache, and
        the identities of what was evaluated; ``candidate`` stands in for the quantized model's result. No
        statistics: the gate is not consulted."""
        config = self.calibration_config(case.model, case.quant)
        quantized = self.quantized(case.model, case.quant_name, config)
        return snapshots.snapshot_of(
            self.evaluate(case.model, case.task.name),
            candidate or self.evaluate(case.model, case.task.name, case.quant_name),
            [item["id"] for item in self.items(case.model, case.task.name)], config.to_dict(),
            model_bytes(quantized.model), quantized.layer_counts(), case.gate["snapshot_tolerance"])
