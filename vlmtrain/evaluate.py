"""``vlmtrain eval``: quality and cost of one or several models at each budget, on the same shards.

Per budget: loss and token accuracy over target tokens (teacher forcing), exact match and word recall of
greedy generations (each assistant turn of a conversation is one question), visual tokens per image,
images per second (batched) and latency per question (prefill, one at a time: median and 10th-90th
percentiles, after an untimed warm-up at that budget); a budget may also be ``auto[:TOL]``, the model's
selector choosing per image. Writes ``eval.json`` and ``eval.png`` (quality and latency against visual
tokens, quality against latency; a line per model), and points each evaluated run directory at them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vlmtrain.data.builder import BatchBuilder, Question
from vlmtrain.data.config import DecodingConfig, TextConfig
from vlmtrain.data.pipeline import EvalStream
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.data.sources import expand_shards
from vlmtrain.errors import UserError
from vlmtrain.inference import ExportedModel, auto_tolerance
from vlmtrain.modeling.geometry import LEVELS
from vlmtrain.modeling.inputs import ImageBatch
from vlmtrain.reporting import progress
from vlmtrain.selector.model import batch_features
from vlmtrain.text.chat import stop_tokens
from vlmtrain.train.layout import LAST_EVALUATION


@dataclass
class BudgetResult:
    """One model at one budget (a level, or ``auto[:TOL]``: the model's selector picks per image)."""

    budget: int | str
    samples: int
    images: int
    loss: float
    token_accuracy: float
    exact_match: float | None
    word_recall: float | None
    visual_tokens_per_image: float
    images_per_s: float
    latency_ms: float  # median
    latency_p10_ms: float
    latency_p90_ms: float
    chosen: dict[str, int] | None = None  # auto: how many images the selector put at each level


def open_model(path: Path) -> ExportedModel:
    """An export folder, or a run directory (its latest checkpoint), ready for evaluation."""
    from vlmtrain.export.write import trained_model
    from vlmtrain.inference import load

    if (path / "vision" / "config.json").is_file():
        return load(path)
    if (path / "recipe.yaml").is_file():
        return trained_model(path)[0]
    raise UserError(f"{path}: neither an export folder (vision/config.json) nor a run directory (recipe.yaml)")


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_recall(target: str, generated: str) -> float:
    """Share of the target's words that the generation contains (1.0 for an empty target)."""
    expected = words(target)
    found = set(words(generated))
    return sum(word in found for word in expected) / len(expected) if expected else 1.0


def first_images(images: ImageBatch, sample: int, count: int) -> ImageBatch:
    """The first ``count`` images of one sample of a batch, as a batch of their own (sample index 0)."""
    chosen = torch.nonzero(images.sample_index == sample).squeeze(1)[:count].tolist()
    selected = images.select(chosen)
    selected.sample_index = torch.zeros_like(selected.sample_index)
    return selected


def clock(device: torch.device) -> float:
    """Seconds, once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def prefill(model: ExportedModel, question: Question, images: ImageBatch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A question's prompt alone through encoder and LM: (prompt ids, input embeddings, seconds taken)."""
    device = next(model.model.parameters()).device
    prompt = torch.tensor([question.prompt_ids], device=device)
    images = images.to(device)
    began = clock(device)
    embeds = model.model.embed(prompt, images)
    model.model.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), use_cache=False)
    return prompt, embeds, clock(device) - began


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (linear interpolation)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), share))


@torch.no_grad()
def answer(model: ExportedModel, question: Question, prompt: torch.Tensor, embeds: torch.Tensor, max_new_tokens: int) -> str:
    """The greedy generation for a question (stopping at its end of turn)."""
    stop = stop_tokens(model.tokenizer, model.description.lm.image_token) if question.chat else model.tokenizer.eos_token_id
    output = model.model.lm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.tokenizer.pad_token_id,
        eos_token_id=stop,
    )
    return model.tokenizer.decode(output[0], skip_special_tokens=True)


class AutoBudgets:
    """``budget="auto[:TOL]"`` in evaluation: each sample's images at the budgets the model's selector picks
    from the sample at the lowest level; the time that takes is kept per sample, to count in its latency."""

    def __init__(self, model: ExportedModel, builder: BatchBuilder, tolerance: float) -> None:
        self.selector = model.budget_selector()
        self.model, self.builder, self.tolerance = model, builder, tolerance
        self.seconds: dict[str, float] = {}
        self.chosen: Counter[int] = Counter()

    @torch.no_grad()
    def __call__(self, sample: RawSample) -> tuple[int, ...]:
        device = next(self.model.model.parameters()).device
        lowest = self.model.geometry.levels[0]
        began = clock(device)
        try:
            inputs = self.builder.collate([self.builder.encode(sample, lowest)], lowest).inputs.to(device)
        except SampleError:
            return (lowest,) * len(sample.sizes)  # the stream skips and counts it
        features = batch_features(self.model.model, inputs)[0]
        chosen = self.selector.choose(features, self.tolerance) if len(features) else []
        self.seconds[sample.key] = clock(device) - began
        self.chosen.update(chosen)
        return tuple(chosen)


LATENCY_SAMPLES = 8
EXAMPLES = 8  # generations kept per budget in eval.json, to read what the model says


@dataclass
class Example:
    """One question's target (a sample's, or an assistant turn's) and the model's greedy generation."""

    key: str
    target: str
    generated: str


@torch.no_grad()
def evaluate_budget(
    model: ExportedModel,
    urls: list[str],
    budget: int | str,
    limit: int,
    batch_tokens: int,
    generate: bool,
    max_new_tokens: int,
    where: dict[str, str] | None = None,
    text: TextConfig | None = None,
) -> tuple[BudgetResult, list[Example]]:
    """One model at one budget over the first ``limit`` samples of ``urls`` (latency: the first few, alone),
    and the first few generations. ``text``: how samples become text (default: as in training)."""
    # any of the five levels, also those the model was not trained at: how it fares there is the question;
    # texts of any length
    geometry = replace(model.geometry, levels=LEVELS)
    fields = replace(text or model.text_format, max_length=sys.maxsize)
    builder = BatchBuilder(geometry, model.text, fields, DecodingConfig(fast=True, max_image_pixels=10**9))
    device = next(model.model.parameters()).device
    loss_sum = correct = tokens = samples = images = visual = 0
    seconds = 0.0
    exact, recall, latencies, examples = [], [], [], []
    auto = AutoBudgets(model, builder, auto_tolerance(budget)) if isinstance(budget, str) else None
    stream = EvalStream(urls, builder, auto or budget, limit, batch_tokens, max_batch_size=64, where=where)
    for pairs, batch in stream.batches():
        inputs = batch.inputs.to(device)
        if samples == 0:  # warm-up at this budget (kernels, allocator, caches), untimed
            model.model.sample_losses(inputs)
            question = next(iter(builder.questions(*pairs[0])), None)
            if question is not None:
                prefill(model, question, first_images(inputs.images, 0, question.images))
        began = clock(device)
        losses = model.model.sample_losses(inputs)
        seconds += clock(device) - began + (sum(auto.seconds.get(s.key, 0.0) for s, _ in pairs) if auto else 0.0)
        loss_sum += float(losses.loss_sum.sum())
        correct += int(losses.correct.sum())
        tokens += int(losses.tokens.sum())
        samples += batch.size
        images += inputs.images.count
        visual += int(inputs.images.token_counts.sum())
        for row, (sample, encoded) in enumerate(pairs):
            for question in builder.questions(sample, encoded):
                if not generate and len(latencies) >= LATENCY_SAMPLES:
                    break
                prompt, embeds, latency = prefill(model, question, first_images(inputs.images, row, question.images))
                latencies.append(latency + (auto.seconds.get(sample.key, 0.0) if auto else 0.0))
                if generate:
                    generated = answer(model, question, prompt, embeds, max_new_tokens)
                    exact.append(generated.strip() == question.target.strip())
                    recall.append(word_recall(question.target, generated))
                    if len(examples) < EXAMPLES:
                        examples.append(Example(sample.key, question.target, generated))
    if samples == 0:
        raise UserError(f"no usable sample in {urls[:1]}... for this model's prompt and target field")
    result = BudgetResult(
        budget=budget,
        samples=samples,
        images=images,
        loss=loss_sum / max(tokens, 1),
        token_accuracy=correct / max(tokens, 1),
        exact_match=sum(exact) / len(exact) if exact else None,
        word_recall=sum(recall) / len(recall) if recall else None,
        visual_tokens_per_image=visual / max(images, 1),
        images_per_s=images / seconds if seconds else 0.0,
        latency_ms=1000 * percentile(latencies, 0.5),
        latency_p10_ms=1000 * percentile(latencies, 0.1),
        latency_p90_ms=1000 * percentile(latencies, 0.9),
        chosen={str(level): auto.chosen[level] for level in model.geometry.levels} if auto else None,
    )
    return result, examples


def evaluate(
    models: list[Path],
    data: str,
    budgets: list[int | str] | None,
    limit: int,
    out: Path,
    names: list[str] | None = None,
    batch_tokens: int = 8192,
    generate: bool = True,
    max_new_tokens: int = 16,
    where: dict[str, str] | None = None,
    text: dict[str, str] | None = None,
) -> dict:
    """Evaluate every model at every budget (on the samples whose record matches ``where``; with ``text``
    overriding the model's prompt, prompt_field or target_field); write ``out/eval.json`` and
    ``out/eval.png``, record their place in each evaluated run directory; return the results."""
    urls = expand_shards(data)
    names = names or [path.name for path in models]
    if len(names) != len(models):
        raise UserError(f"{len(names)} names for {len(models)} models")
    results = {"data": data, "limit": limit, "where": where or {}, "text": text or {}, "models": []}
    for name, path in zip(names, models, strict=True):
        model = open_model(path)
        fields = replace(model.text_format, **(text or {}))
        levels = budgets or list(model.geometry.levels)
        evaluated = [evaluate_budget(model, urls, b, limit, batch_tokens, generate, max_new_tokens, where, fields)
                     for b in progress(levels, f"evaluating {name} budget by budget", len(levels))]
        rows, examples = [row for row, _ in evaluated], [found for _, found in evaluated]
        untrained = [budget for budget in levels if isinstance(budget, int) and budget not in model.geometry.levels]
        trained = ", ".join(map(str, model.geometry.levels))
        warnings = [f"trained at {trained} only: {', '.join(map(str, untrained))} never seen in training"] if untrained else []
        results["models"].append(
            {
                "name": name,
                "path": str(path.resolve()),
                "warnings": warnings,
                "budgets": [asdict(row) for row in rows],
                "examples": {str(row.budget): [asdict(e) for e in found] for row, found in zip(rows, examples, strict=True)},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "eval.png")
    for path in models:
        if (path / "recipe.yaml").is_file():  # a run directory: export finds its evaluation from here
            (path / LAST_EVALUATION).write_text(f"{(out / 'eval.json').resolve()}\n")
    return results


def plot(results: dict, path: Path) -> None:
    """Three panels, a line per model for its fixed budgets and a dashed one for auto (a point per tolerance):
    quality against visual tokens per image, latency against visual tokens, quality against latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, latency, by_latency) = plt.subplots(1, 3, figsize=(16, 4.6))
    samples = max(row["samples"] for model in results["models"] for row in model["budgets"])
    where = "".join(f", {field}={value}" for field, value in results.get("where", {}).items())
    figure.suptitle(f"{results['data']}{where}: {samples} samples per budget", fontsize=9)
    for model in results["models"]:
        color = None
        for auto in (False, True):
            rows = [row for row in model["budgets"] if isinstance(row["budget"], str) == auto]
            rows.sort(key=lambda row: row["visual_tokens_per_image"])
            if not rows:
                continue
            label = f"{model['name']}: {'auto' if auto else 'fixed budgets'}"
            style = {"marker": "D" if auto else "o", "linestyle": "--" if auto else "-", "label": label}
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
