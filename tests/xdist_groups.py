"""pytest-xdist scheduling by model (conftest.py's pytest_xdist_make_scheduler)."""
from __future__ import annotations

from collections.abc import Iterable

from xdist.scheduler import LoadScopeScheduling


class ModelGroupScheduling(LoadScopeScheduling):
    """LoadScope's whole-group-to-one-worker scheduling, with a test's group being the model its parameters name
    (``test_retention[smollm2-135m-rtn-w4g128-boolq]`` -> ``smollm2-135m``), else the test itself."""

    def __init__(self, config, log, models: Iterable[str]) -> None:
        super().__init__(config, log)
        self.models = sorted(models, key=len, reverse=True)  # the longest first: no name hides in a longer one

    def _split_scope(self, nodeid: str) -> str:
        params = nodeid.partition("[")[2]
        return next((model for model in self.models if model in params), nodeid)
