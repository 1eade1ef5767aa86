"""The report's pictures, written next to its Markdown: retention with its interval per task and config, and the
mean KLD per config. Drawn from the report's rows, so a written ``latest.json`` redraws them."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

VERDICT_COLOURS = {"pass": "tab:green", "fail": "tab:red", "inconclusive": "tab:orange", "uninformative": "tab:gray"}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(figure: Any, title: str, path: Path) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path


def headline_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each (model, config, task)'s first measured row: the task's headline metric."""
    first: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in report["rows"]:
        if not row.get("skipped_reason"):
            first.setdefault((row["model"], row["quant"], row["task"]), row)
    return list(first.values())


def retention_chart(report: dict[str, Any], path: Path) -> Path | None:
    """A panel per model and task: each config's retention with its 95% interval, coloured by verdict."""
    rows = headline_rows(report)
    panels = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    if not panels:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.5 * len(rows) / len(panels) + 2),
                                squeeze=False)
    for axis, (model, task) in zip(axes[0], panels):
        shown = [r for r in rows if (r["model"], r["task"]) == (model, task) and r["retention"] is not None]
        for y, row in enumerate(shown):
            low, high = row["retention_ci_low"], row["retention_ci_high"]
            error = None if low is None else [[row["retention"] - low], [high - row["retention"]]]
            axis.errorbar(row["retention"], y, xerr=error, fmt="o", capsize=3, color=VERDICT_COLOURS[row["verdict"]])
        axis.set_yticks(range(len(shown)), [r["quant"] for r in shown], fontsize=7)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(f"{model} {task} ({shown[0]['metric'] if shown else 'no retention'})", fontsize=8)
        if not shown:  # measured rows whose retention is undefined say why, instead of an empty panel
            reason = next(r["verdict_reason"] for r in rows if (r["model"], r["task"]) == (model, task))
            axis.text(0.5, 0.5, textwrap.fill(reason.split(";")[0], 30), ha="center", va="center", fontsize=8,
                      transform=axis.transAxes)
        axis.set_xlabel("retention (95% CI)")
        axis.grid(alpha=0.3)
    legend = ", ".join(f"{verdict} = {colour.removeprefix('tab:')}" for verdict, colour in VERDICT_COLOURS.items())
    return save(figure, f"retention against the baseline per task ({legend})", path)


def kld_chart(report: dict[str, Any], path: Path) -> Path | None:
    """Mean KLD to the baseline (± its standard error) per config, a panel per model."""
    rows = [r for r in headline_rows(report) if r.get("mean_kld") is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        shown = sorted((r for r in rows if r["model"] == model), key=lambda r: r["mean_kld"])
        axis.barh([r["quant"] for r in shown], [r["mean_kld"] for r in shown],
                  xerr=[r["mean_kld_se"] for r in shown], color=[VERDICT_COLOURS[r["verdict"]] for r in shown])
        axis.set_xlabel("mean KLD(baseline || quantized), full vocabulary, per token")
        axis.set_title(model, fontsize=9)
        axis.tick_params(axis="y", labelsize=7)
        axis.grid(alpha=0.3, axis="x")
    return save(figure, "mean KLD to the baseline, WikiText\n(colour: the verdict)", path)
