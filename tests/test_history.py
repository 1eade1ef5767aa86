"""The benchmark workflow end to end on a toy benchmark: two autosaved runs, a compare that fails on a
regression beyond the threshold and shows the diff, and the history PNG with a point per run."""
import json

from quant.history import load_runs, plot, series

TOY_BENCHMARK = """
import os, time

def test_decode(benchmark):
    seconds = float(os.environ["TOY_SECONDS"])
    benchmark.pedantic(time.sleep, args=(seconds,), rounds=3)
    benchmark.extra_info.update({"variant": "toy-w4", "tokens_per_s": 1 / seconds, "model_bytes": 1000,
                                 "score.wikitext.perplexity": 30.0, "retention.wikitext.perplexity": 0.9})
"""


def test_autosave_compare_and_history(pytester, tmp_path, monkeypatch):
    storage = tmp_path / "benchmarks"
    pytester.makepyfile(test_toy=TOY_BENCHMARK)
    run = ["-p", "no:cacheprovider", f"--benchmark-storage=file://{storage}"]
    monkeypatch.setenv("TOY_SECONDS", "0.001")
    pytester.runpytest_subprocess(*run, "--benchmark-autosave").assert_outcomes(passed=1)
    pytester.runpytest_subprocess(*run, "--benchmark-autosave").assert_outcomes(passed=1)
    saved = sorted(storage.glob("*/*.json"))
    assert [p.name[:4] for p in saved] == ["0001", "0002"]
    assert json.loads(saved[0].read_text())["benchmarks"][0]["extra_info"]["variant"] == "toy-w4"

    # 20x slower than the latest saved run: the documented compare command must fail and show both
    monkeypatch.setenv("TOY_SECONDS", "0.02")
    compared = pytester.runpytest_subprocess(*run, "--benchmark-compare", "--benchmark-compare-fail=median:50%")
    assert compared.ret != 0
    compared.stdout.fnmatch_lines(["*test_decode (0002_*", "*test_decode (NOW)*"])  # the diff, side by side
    compared.stderr.fnmatch_lines(["*Performance has regressed*"])

    runs = load_runs(storage)
    panels = series(runs)
    assert all(len(points) == 2 for lines in panels.values() for points in lines.values())
    assert set(panels) == {"latency, median (ms)", "throughput (tokens/s)", "model memory (MB)", "score", "retention"}
    png = plot(storage, tmp_path / "history.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
