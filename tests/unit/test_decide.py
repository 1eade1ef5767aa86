"""Decisions read from a written report (quant/decide.py): the Pareto frontier, recommendations under constraints,
and correlations of perplexity with task retention."""
import json

import pytest

from quant import decide
from quant.config import ConfigError
from tests.helpers.report_rows import decision_report as _decision_report


def test_points_take_each_tasks_headline_metric_and_leave_uninformative_tasks_out():
    candidates, baseline = decide.points(_decision_report(), "smollm2-135m")
    by_quant = {p.quant: p for p in candidates}
    assert sorted(by_quant["rtn-w4g32"].retention) == ["msmarco", "wikitext"]  # boolq is uninformative
    assert by_quant["rtn-w4g32"].retention["wikitext"] == (0.93, 0.91, 0.95)
    assert by_quant["rtn-w4g32"].score(decide.AVERAGE) == pytest.approx((0.94, 0.885, 0.985))
    assert by_quant["rtn-w4g128"].mean_kld == 0.5 and by_quant["rtn-w4g128"].decode_speedup == 2.1
    assert baseline.bytes == 538e6 and baseline.retention["wikitext"] == (1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="no measured rows for model 'phi-1.5'"):
        decide.points(_decision_report(), "phi-1.5")


def test_the_frontier_keeps_only_configs_no_other_beats_on_both_axes():
    candidates, _ = decide.points(_decision_report(), "smollm2-135m")
    assert [p.quant for p in decide.frontier(candidates, "wikitext")] == ["rtn-w4g128", "rtn-w4g32", "rtn-w8"]
    dominated = decide.Point("smollm2-135m", "gptq-bad", 130e6, 1.5, {"wikitext": (0.92, 0.9, 0.94)}, 0.4)
    assert "gptq-bad" not in [p.quant for p in decide.frontier(candidates + [dominated], "wikitext")]
    assert [p.quant for p in decide.frontier(candidates + [dominated], "kld")] == ["rtn-w4g128", "rtn-w4g32", "rtn-w8"]


def test_recommend_judges_retention_on_the_interval_and_names_what_nothing_meets():
    candidates, _ = decide.points(_decision_report(), "smollm2-135m")
    # w4g32's point estimate 0.93 would pass 0.92, its lower bound 0.91 does not: the gate's rule
    apart = decide.recommend(candidates, "wikitext", max_bytes=decide.parse_size("130MB"), min_retention=0.92)
    assert apart.chosen is None and apart.unmet == []  # w8 holds the retention, the w4s the memory
    assert apart.lines("wikitext")[0].endswith("each is met by some config, never all at once")
    assert apart.closest.quant == "rtn-w4g32"  # each misses one constraint; w4g32 by the least (0.91 for 0.92)
    assert decide.recommend(candidates, "wikitext", max_bytes=130e6, min_retention=0.9).chosen.quant == "rtn-w4g32"
    fast = decide.recommend(candidates, "wikitext", min_retention=0.85, min_decode_speedup=2)
    assert fast.lines("wikitext")[0].startswith(
        "ship rtn-w4g128: 100 MB, retention on wikitext 0.900 [95% CI 0.870, 0.930], decode 2.10x the baseline")
    unreachable = decide.recommend(candidates, "wikitext", min_retention=0.99)
    assert unreachable.unmet == ["retention lower bound on wikitext >= 0.99"]
    assert unreachable.closest.quant == "rtn-w8"  # 0.98 of 0.99
    with pytest.raises(ConfigError, match="150 parsecs"):
        decide.parse_size("150 parsecs")
    assert decide.parse_size("1.5GB") == 1.5e9 and decide.parse_size("200MiB") == 200 * 2**20


def test_pareto_and_recommend_commands(tmp_path, capsys):
    from quant.cli import main

    path = tmp_path / "latest.json"
    path.write_text(json.dumps(_decision_report()))
    assert main(["pareto", "--report", str(path), "--task", "wikitext"]) == 0
    png = tmp_path / "pareto-smollm2-135m-wikitext.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "rtn-w4g128: 100 MB, retention 0.900" in capsys.readouterr().out
    assert main(["recommend", "--report", str(path), "--task", "wikitext", "--max-memory", "150MB",
                 "--min-retention", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("ship rtn-w4g32")
    assert main(["recommend", "--report", str(path), "--task", "wikitext", "--max-memory", "110MB",
                 "--min-retention", "0.95"]) == 1
    assert "closest: rtn-w4g128" in capsys.readouterr().out  # 0.87 for 0.95; w8 is 45% too large


def test_spearman_with_its_exact_permutation_p_value():
    assert decide.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == (pytest.approx(1.0), pytest.approx(2 / 24))
    assert decide.spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    rho, p = decide.spearman([1, 2, 2, 3], [1, 3, 2, 4])  # ties share their mean rank
    assert rho == pytest.approx(0.9486832980505138) and 0 < p < 1
    rho, p = decide.spearman(list(range(12)), list(range(12)))  # sampled permutations beyond 8 items
    assert rho == pytest.approx(1.0) and p < 0.001


def test_correlations_skip_uninformative_tasks_and_state_n_and_p(tmp_path, capsys):
    table = decide.correlations(_decision_report(), "smollm2-135m")
    assert table[0] == {"task": "boolq", "note": "uninformative for this model: not correlated"}
    # msmarco retention falls as the perplexity ratio and the KLD rise: rho -1 over 3 configs, p = 2 / 3!
    assert table[1] == {"task": "msmarco", "predictor": "perplexity ratio", "n": 3, "rho": pytest.approx(-1.0),
                        "p": pytest.approx(1 / 3)}
    assert table[2]["predictor"] == "mean KLD" and table[2]["rho"] == pytest.approx(-1.0)
    from quant.cli import main

    path = tmp_path / "latest.json"
    path.write_text(json.dumps(_decision_report()))
    assert main(["correlate", "--report", str(path)]) == 0
    assert "msmarco vs perplexity ratio: rho -1.000, n 3, p 0.333" in capsys.readouterr().out
