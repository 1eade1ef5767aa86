"""The benchmark workflow end to end on a toy benchmark: two autosaved runs, a compare that fails on a
regression beyond the threshold and shows the diff, and the history PNG with a point per run."""
import json

from quant.cli import main
from quant.history import Change, load_runs, plot, series

TOY_BENCHMARK = """
import os, time

def test_decode(benchmark):
    seconds = float(os.environ["TOY_SECONDS"])
    benchmark.pedantic(time.sleep, args=(seconds,), rounds=3)
    benchmark.extra_info.update({"variant": "toy-w4", "tokens_per_s": 1 / seconds, "model_bytes": 1000,
                                 "score.wikitext.perplexity": 30.0, "retention.wikitext.perplexity": 0.9})
"""


def test_autosave_compare_and_history(pytester, tmp_path, monkeypatch, capsys):
    storage = tmp_path / "benchmarks"
    pytester.makepyfile(test_toy=TOY_BENCHMARK)
    run = ["-p", "no:cacheprovider", f"--benchmark-storage=file://{storage}"]
    # under pytest -n, an inner run that inherits the variable counts as an xdist worker: pytest-benchmark saves nothing
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setenv("TOY_SECONDS", "0.001")
    pytester.runpytest_subprocess(*run, "--benchmark-autosave").assert_outcomes(passed=1)
    pytester.runpytest_subprocess(*run, "--benchmark-autosave").assert_outcomes(passed=1)
    saved = sorted(storage.glob("*/*.json"))
    assert [p.name[:4] for p in saved] == ["0001", "0002"]
    assert json.loads(saved[0].read_text())["benchmarks"][0]["extra_info"]["variant"] == "toy-w4"

    # two unchanged runs: within noise, whatever their medians did
    assert main(["bench-compare", "--storage", str(storage), "--threshold", "0.5"]) == 0
    assert "0 regression(s) in 1 benchmarks" in capsys.readouterr().out
    # 20x slower than the latest saved run: the documented compare command fails and names it
    monkeypatch.setenv("TOY_SECONDS", "0.02")
    pytester.runpytest_subprocess(*run, "--benchmark-autosave").assert_outcomes(passed=1)
    assert main(["bench-compare", "--storage", str(storage), "--threshold", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "0003_" in out and "test_decode" in out and ": regression" in out

    runs = load_runs(storage)
    panels = series(runs)
    assert all(len(points) == 3 for lines in panels.values() for points in lines.values())
    assert set(panels) == {"latency, median (ms)", "throughput (tokens/s)", "model memory (MB)", "score", "retention"}
    png = plot(storage, tmp_path / "history.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_regression_is_claimed_only_when_the_whole_interval_lies_beyond_the_threshold():
    busy = Change("decode", 1.0, 1.5, 1.5, 0.9, 2.4)  # median +50%, but the rounds overlap: a busy runner
    slower = Change("decode", 1.0, 1.5, 1.5, 1.45, 1.6)
    assert busy.verdict(0.4) == "within noise" and slower.verdict(0.4) == "regression"
    assert Change("decode", 1.0, 0.5, 0.5, 0.45, 0.55).verdict(0.4) == "faster"
