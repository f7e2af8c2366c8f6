"""``vlmtrain eval``: quality and cost of one or several models at each budget, on the same shards.

Per budget: loss and token accuracy over target tokens (teacher forcing), exact match and word recall of
greedy generations (each assistant turn of a conversation is one question), visual tokens per image,
images per second (batched) and latency per question (prefill, one at a time: median and 10th-90th
percentiles, after an untimed warm-up at that budget); a budget may also be ``auto[:TOL]``, the model's
selector choosing per image, or ``record``, each image and frame at the budget its record fixes (a video's key
frames). Writes ``eval.json`` and ``eval.png`` (quality and latency against visual
tokens, quality against latency; a line per model), and points each evaluated run directory at them.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from vlmtrain.data.builder import BatchBuilder, Question
from vlmtrain.data.pipeline import EvalStream
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.data.sources import expand_shards
from vlmtrain.errors import UserError
from vlmtrain.evaluate.latency import LatencyProbe, clock
from vlmtrain.evaluate.metrics import RECORD, BudgetResult, Tally
from vlmtrain.evaluate.plot import plot
from vlmtrain.export.format import TextFormat
from vlmtrain.inference import ExportedModel, auto_tolerance, open_model
from vlmtrain.modeling.geometry import LEVELS
from vlmtrain.modeling.inputs import ImageBatch
from vlmtrain.reporting import progress
from vlmtrain.train.layout import LAST_EVALUATION, RECIPE_FILE


def first_images(images: ImageBatch, sample: int, count: int) -> ImageBatch:
    """The first ``count`` images of one sample of a batch, as a batch of their own (sample index 0)."""
    chosen = torch.nonzero(images.sample_index == sample).squeeze(1)[:count].tolist()
    selected = images.select(chosen)
    selected.sample_index = torch.zeros_like(selected.sample_index)
    return selected


def asked(question: Question, images: ImageBatch, row: int) -> tuple[torch.Tensor, ImageBatch]:
    """A question's prompt ids ``(1, L)`` and its images, from row ``row`` of a batch's images."""
    return torch.tensor([question.prompt_ids], device=images.pixels.device), first_images(images, row, question.images)


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
        device = self.model.device
        lowest = self.model.geometry.levels[0]
        began = clock(device)
        try:
            inputs = self.builder.collate([self.builder.encode(sample, lowest)], lowest).inputs.to(device)
        except SampleError:
            return (lowest,) * len(sample.sizes)  # the stream skips and counts it
        features = self.model.selector_features(inputs)[0]
        chosen = self.selector.choose(features, self.tolerance) if len(features) else []
        self.seconds[sample.key] = clock(device) - began
        self.chosen.update(chosen)
        return tuple(chosen)


def fixed_budgets(model: ExportedModel, sample: RawSample) -> tuple[int, ...]:
    """``budget="record"`` in evaluation: each of the sample's images and frames at the budget its record fixes
    (a video's, its key frames'), the others at the model's defaults (its video budget for frames)."""
    videos = sample.frame_of or [None] * len(sample.budgets)
    return tuple(
        budget if budget is not None else model.video.budget if video is not None else model.description.default_budget
        for budget, video in zip(sample.budgets, videos, strict=True)
    )


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
    text: TextFormat | None = None,
) -> tuple[BudgetResult, list[Example]]:
    """One model at one budget over the first ``limit`` samples of ``urls`` (latency: the first few, alone),
    and the first few generations. ``text``: how samples become text (default: as in training)."""
    # any of the five levels, also those the model was not trained at: how it fares there is the question;
    # texts of any length
    geometry = replace(model.geometry, levels=LEVELS)
    fields = (text or model.text_format).text_config(max_length=sys.maxsize)
    builder = model.batch_builder(fields, geometry)
    tally, probe, examples = Tally(), LatencyProbe(model), []
    auto = AutoBudgets(model, builder, auto_tolerance(budget)) if isinstance(budget, str) and budget != RECORD else None
    chooser = auto or (partial(fixed_budgets, model) if budget == RECORD else budget)
    stream = EvalStream(urls, builder, chooser, limit, batch_tokens, max_batch_size=64, where=where)
    for pairs, batch in stream.batches():
        inputs = batch.inputs.to(model.device)
        if tally.samples == 0:  # warm-up at this budget (kernels, allocator, caches), untimed
            model.sample_losses(inputs)
            question = next(iter(builder.questions(*pairs[0])), None)
            if question is not None:
                probe.warm_up(*asked(question, inputs.images, 0))
        began = clock(model.device)
        losses = model.sample_losses(inputs)
        choosing = sum(auto.seconds.get(sample.key, 0.0) for sample, _ in pairs) if auto else 0.0
        tally.add_batch(losses, inputs.images, clock(model.device) - began + choosing)
        for row, (sample, encoded) in enumerate(pairs):
            for question in builder.questions(sample, encoded):
                if not generate and len(probe.seconds) >= LATENCY_SAMPLES:
                    break
                prompt, images = asked(question, inputs.images, row)
                prefilled = probe.measure(prompt, images, extra=auto.seconds.get(sample.key, 0.0) if auto else 0.0)
                if generate:
                    generated = model.continue_from(prefilled, question.chat, max_new_tokens)
                    tally.add_answer(question.target, generated)
                    if len(examples) < EXAMPLES:
                        examples.append(Example(sample.key, question.target, generated))
    if tally.samples == 0:
        raise UserError(f"no usable sample in {urls[:1]}... for this model's prompt and target field")
    chosen = {str(level): auto.chosen[level] for level in model.geometry.levels} if auto else None
    return tally.result(budget, probe.milliseconds(), chosen), examples


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
        if (path / RECIPE_FILE).is_file():  # a run directory: export finds its evaluation from here
            (path / LAST_EVALUATION).write_text(f"{(out / 'eval.json').resolve()}\n")
    return results
