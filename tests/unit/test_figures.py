"""The report's figures (quant/figures.py): which rows they draw, and a PNG for each."""
import matplotlib.axes

from quant import figures
from tests.helpers.report_rows import decision_report, row

PNG = b"\x89PNG"


def test_each_model_task_and_config_is_drawn_once_from_its_headline_row():
    built = decision_report()
    built["rows"] += [row("rtn-w8", "msmarco", "mrr@10", "pass"),  # a secondary metric of a drawn task
                      {**row("gptq-w4g128", "boolq", "accuracy", "pass"), "skipped_reason": "tier gpu"}]
    drawn = [(r["quant"], r["task"], r["metric"]) for r in figures.headline_rows(built)]
    assert drawn == [(quant, task, metric) for quant in ("rtn-w8", "rtn-w4g32", "rtn-w4g128")
                     for task, metric in (("boolq", "accuracy"), ("wikitext", "perplexity"), ("msmarco", "ndcg@10"))]


def test_the_kld_figure_is_drawn_only_when_rows_have_a_kld(tmp_path):
    built = decision_report()
    without = {"rows": [r for r in built["rows"] if r["mean_kld"] is None]}
    assert figures.kld_chart(without, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    for r in built["rows"]:
        r["mean_kld_se"] = None if r["mean_kld"] is None else 0.01
    assert figures.kld_chart(built, tmp_path / "kld.png").read_bytes()[:4] == PNG
    assert figures.retention_chart(built, tmp_path / "retention.png").read_bytes()[:4] == PNG


def test_a_panel_without_a_retention_says_why_instead_of_staying_empty(tmp_path, monkeypatch):
    written = []
    text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda axis, x, y, s, **kwargs: written.append(" ".join(s.split())) or text(axis, x, y, s, **kwargs))
    solved_none = {**row("rtn-w8", "gsm8k", "exact_match", "uninformative",
                         reason="the baseline solves 0 items, fewer than min_correct=5; answer-format retention 1.0"),
                   "retention": None}
    assert figures.retention_chart({"rows": [solved_none]}, tmp_path / "r.png").read_bytes()[:4] == PNG
    assert written == ["the baseline solves 0 items, fewer than min_correct=5"]
