"""The regression gate: one test per matrix case (model x quantization config x task)."""
from quant.report import describe


def test_retention(case, workbench):
    comparison = workbench.compare(case)
    assert not comparison.verdict.failed, describe(comparison)
