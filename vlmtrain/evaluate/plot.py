"""What an evaluation looks like: three panels (quality and latency against visual tokens, quality against
latency; a line per model, auto dashed, the records' budgets dotted), and the same logged to W&B."""

from __future__ import annotations

from pathlib import Path

from vlmtrain.evaluate.metrics import RECORD, BudgetResult

STYLES = {  # how each kind of budget is drawn
    "fixed budgets": {"marker": "o", "linestyle": "-"},
    "auto": {"marker": "D", "linestyle": "--"},
    "the records' budgets": {"marker": "s", "linestyle": ":"},
}


def budget_kind(budget: int | str) -> str:
    """Which line of :data:`STYLES` a budget's result is drawn on."""
    return "fixed budgets" if isinstance(budget, int) else "the records' budgets" if budget == RECORD else "auto"


def plot(results: dict, path: Path) -> None:
    """Three panels, a line per model for its fixed budgets, a dashed one for auto (a point per tolerance) and a
    dotted point for the records' budgets: quality against visual tokens per image, latency against visual tokens,
    quality against latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, latency, by_latency) = plt.subplots(1, 3, figsize=(16, 4.6))
    samples = max(row["samples"] for model in results["models"] for row in model["budgets"])
    where = "".join(f", {field}={value}" for field, value in results.get("where", {}).items())
    figure.suptitle(f"{results['data']}{where}: {samples} samples per budget", fontsize=9)
    for model in results["models"]:
        color = None
        for kind, drawn in STYLES.items():
            rows = [row for row in model["budgets"] if budget_kind(row["budget"]) == kind]
            rows.sort(key=lambda row: row["visual_tokens_per_image"])
            if not rows:
                continue
            style = {**drawn, "label": f"{model['name']}: {kind}"}
            tokens = [row["visual_tokens_per_image"] for row in rows]
            quality = [row["exact_match"] if row["exact_match"] is not None else row["token_accuracy"] for row in rows]
            medians = [row["latency_ms"] for row in rows]
            spread = [[m - row["latency_p10_ms"] for m, row in zip(medians, rows, strict=True)],
                      [row["latency_p90_ms"] - m for m, row in zip(medians, rows, strict=True)]]
            color = by_tokens.plot(tokens, quality, color=color, **style)[0].get_color()
            latency.errorbar(tokens, medians, yerr=spread, capsize=3, color=color, **style)
            by_latency.plot(medians, quality, color=color, **style)
            for row, x, y in zip(rows, tokens, quality, strict=True):
                by_tokens.annotate(str(row["budget"]), (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    quality_label = "exact match (token accuracy without generation)"
    for axis, title, xlabel, ylabel in (
        (by_tokens, "quality vs visual tokens", "visual tokens per image", quality_label),
        (latency, "latency vs visual tokens", "visual tokens per image", "ms per question (prefill): median, p10-p90"),
        (by_latency, "quality vs latency", "ms per question (median)", quality_label),
    ):
        axis.set_xscale("log")
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    by_tokens.set_ylim(-0.02, 1.02)
    by_latency.set_ylim(-0.02, 1.02)
    latency.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def log_to_wandb(results: dict, out: Path, project: str, offline: bool) -> None:
    """Log the results table and the plot to a W&B run (offline unless asked)."""
    import wandb

    run = wandb.init(project=project, job_type="eval", mode="offline" if offline else "online", dir=str(out))
    columns = ["model", *BudgetResult.__dataclass_fields__]
    table = wandb.Table(columns=columns, data=[[m["name"], *row.values()] for m in results["models"] for row in m["budgets"]])
    run.log({"eval/table": table, "eval/plot": wandb.Image(str(out / "eval.png"))})
    run.finish()
