"""The suite's pytest plugin lives in the package (quant/pytest_plugin.py); this loads it for every run here."""

pytest_plugins = ["pytester", "quant.pytest_plugin"]  # pytester: tests/test_snapshots.py runs syrupy end to end
