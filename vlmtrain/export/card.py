"""The model card of an export folder (README.md): what the model is, how to load it, its results by budget."""

from __future__ import annotations

from typing import Any

from vlmtrain.config import Recipe
from vlmtrain.export.format import Layout
from vlmtrain.model.description import ModelDescription


def model_card(recipe: Recipe, description: ModelDescription, layout: Layout, prompt: str, evaluation: dict | None) -> str:
    """A README for the export folder: what the model is, how to load it (the layout's own lines), and its
    per-budget results."""
    geometry = description.geometry()
    cell = geometry.cell
    lines = [
        f"# {recipe.name}",
        "",
        "A vision-language model with a mixed-budget vision encoder, trained with vlmtrain. One image is",
        f"represented by at most {', '.join(map(str, geometry.levels))} visual tokens, chosen per image",
        (
            f"(patch {geometry.patch_size}, pool {geometry.pool}: one token per {cell}x{cell} pixels; "
            f"default {description.default_budget})."
        ),
        "",
        f"- vision encoder: {description.vision.kind}, pooling: {description.pooling.kind}",
        layout.card_summary,
        f"- image token: `{description.lm.image_token}`; prompt template: `{prompt!r}`",
        "",
        "```python",
        "import vlmtrain",
        "from PIL import Image",
        'model = vlmtrain.load("PATH/TO/THIS/FOLDER")',
        f'print(model.generate([Image.open("page.png")], budget={max(geometry.levels)}))',
        "```",
    ]
    lines += layout.card_usage(prompt, max(geometry.levels))
    if evaluation is not None:
        model = evaluation["models"][0]
        samples = max(row["samples"] for row in model["budgets"])
        lines += [
            "",
            "## Results by budget",
            "",
            f"Evaluated on `{evaluation.get('data', '?')}`, {samples} samples per budget.",
            "",
            results_table(model),
        ]
    lines += ["", "## Training recipe", "", "See `recipe.yaml`."]
    return "\n".join(lines) + "\n"


def latency_spread(row: dict[str, Any]) -> str:
    """`` (p10-p90)`` of a row's latency (absent from evaluations written before it was measured)."""
    return f" ({row['latency_p10_ms']:.1f}-{row['latency_p90_ms']:.1f})" if "latency_p10_ms" in row else ""


def budget_cell(row: dict[str, Any]) -> str:
    """A row's budget; for auto, with how many images the selector put at each level."""
    chosen = ", ".join(f"{level}: {count}" for level, count in (row.get("chosen") or {}).items() if count)
    return f"{row['budget']} ({chosen})" if chosen else str(row["budget"])


def results_table(model_results: dict[str, Any]) -> str:
    """A Markdown table of one model's evaluation, a row per budget."""
    rows = [
        "| budget | loss | token accuracy | exact match | word recall | visual tokens / image | / sample | images/s "
        "| latency (p10-p90) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in model_results["budgets"]:
        exact = "-" if row.get("exact_match") is None else f"{row['exact_match']:.1%}"
        recall = "-" if row.get("word_recall") is None else f"{row['word_recall']:.1%}"
        rows.append(
            f"| {budget_cell(row)} | {row['loss']:.3f} | {row['token_accuracy']:.1%} | {exact} | {recall} | "
            f"{row['visual_tokens_per_image']:.0f} | {row['visual_tokens_per_sample']:.0f} | {row['images_per_s']:.1f} | "
            f"{row['latency_ms']:.1f} ms{latency_spread(row)} |"
        )
    return "\n".join(rows)
