"""The regression gates, one test per matrix case (model x quantization config x task): against the baseline
model (retention, KLD) and against the committed snapshot of the case's own earlier results."""
import pytest

from quant.report import describe


@pytest.mark.regression_gate
def test_retention(case, workbench, record_gate):
    comparison = workbench.settle(case)
    record_gate(case.id, comparison)
    assert not comparison.verdict.failed, describe(comparison)


def test_snapshot(case, workbench, metrics_snapshot):
    """Metrics within tolerance of baselines/<hardware>/<profile>/test_matrix.json; items, config, bytes exact."""
    assert metrics_snapshot == workbench.snapshot(case)
