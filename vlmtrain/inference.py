"""Using an exported model (see :mod:`vlmtrain.export`) without Lightning or DeepSpeed: weights come from
safetensors and settings from JSON only, never from a pickle.

The export's ``vision/config.json`` holds the model description (:mod:`vlmtrain.model.description`), which
is built through the same builder as in training; the weights file keeps its own copy of the description,
so a config edited after export is refused, naming the key, instead of computing something else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from vlmtrain.config import RecipeError, structured
from vlmtrain.data.config import TextConfig
from vlmtrain.errors import UserError
from vlmtrain.families import build_model
from vlmtrain.families.gemma4 import vlmtrain_weights
from vlmtrain.model.description import ModelDescription, first_difference, read_description
from vlmtrain.model.lm import lm_tokenizer
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.inputs import ImageBatch
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.selector.model import BudgetSelector, load_selector, question_embedding, selector_features
from vlmtrain.text.chat import stop_tokens
from vlmtrain.text.conversation import check_conversation, parse_messages
from vlmtrain.text.encoding import TextEncoder

EXPORT_FORMAT = "vlmtrain-model/3"  # 3: the projector has a kind
VISION_PARTS = ("backbone", "pooling", "projector")
VISION_DIR, LM_DIR, ADAPTER_DIR = "vision", "lm", "lm-adapter"
VLMTRAIN_LAYOUT, GEMMA4_LAYOUT = "vlmtrain", "gemma4"  # where an export's weights are (vlmtrain.export)
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
DESCRIPTION_KEY = "vlmtrain.model"  # the description's copy in the weights file's metadata


AUTO_TOLERANCE = 0.05  # budget="auto": the loss gap (nats per target token) a smaller budget may cost
SELECTOR_DIR = "selector"


def auto_tolerance(budget: str) -> float:
    """The tolerance of ``"auto"`` (the default) or ``"auto:TOL"``; anything else is refused in one line."""
    name, _, value = budget.partition(":")
    try:
        tolerance = float(value) if value else AUTO_TOLERANCE
    except ValueError:
        tolerance = float("nan")
    if name != "auto" or not tolerance >= 0:
        raise UserError(f"budget {budget!r}: a level, a list of levels, 'auto' or 'auto:TOL' with TOL >= 0 (e.g. auto:0.1)")
    return tolerance


@dataclass
class AutoChoice:
    """What ``budget="auto"`` decided for one request: a budget per image, and the lowest-level pass the
    selector ran (prompt ids, images, visual tokens), reused for the images it leaves at the lowest level."""

    budgets: list[int]
    input_ids: torch.Tensor
    batch: ImageBatch
    visual: torch.Tensor


class ExportedModel:
    """A model ready for use: prepare images at any budget (one per image), get logits, generate text."""

    def __init__(
        self, model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, description: ModelDescription, text: TextConfig
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.description = description
        self.text_format = text
        self.text = TextEncoder(tokenizer, description.lm.image_token)
        self.selector: BudgetSelector | None = None  # set by load() when the export has one

    @property
    def geometry(self) -> Geometry:
        return self.model.geometry

    def budget_selector(self) -> BudgetSelector:
        """The export's budget selector, for ``budget="auto"``; one line when it has none."""
        if self.selector is None:
            raise UserError("this model has no budget selector (vlmtrain label-budgets, then vlmtrain train-selector)")
        return self.selector

    @torch.no_grad()
    def auto_choice(
        self, images: Sequence[Image.Image], prompt: str | None, messages: list[dict[str, Any]] | None, tolerance: float
    ) -> AutoChoice:
        """The selector's budget for each image: the smallest level whose predicted loss gap, from the image at
        the lowest level and the question's text, is at most ``tolerance`` (nats per target token); with the
        lowest-level pass it ran, to reuse."""
        selector = self.budget_selector()
        input_ids, batch = self.inputs(images, prompt, self.geometry.levels[0], messages)
        visual = self.model.encode_images(batch)
        question = question_embedding(self.model.lm.get_input_embeddings(), input_ids[0], self.model.image_token_id)
        budgets = selector.choose(selector_features(visual.float(), batch.token_counts, question), tolerance)
        return AutoChoice(budgets, input_ids, batch, visual)

    def auto_budgets(
        self, images: Sequence[Image.Image], prompt: str | None, messages: list[dict[str, Any]] | None, tolerance: float
    ) -> list[int]:
        """The selector's budget for each image (:meth:`auto_choice`)."""
        return self.auto_choice(images, prompt, messages, tolerance).budgets

    @torch.no_grad()
    def embeddings(
        self,
        images: Sequence[Image.Image],
        prompt: str | None,
        budget: int | str | Sequence[int] | None,
        messages: list[dict[str, Any]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, LM input embeddings). With ``budget="auto[:TOL]"`` the selector's pass at the lowest
        level is reused for the images it leaves there: only the others go through the encoder again."""
        if not isinstance(budget, str):
            input_ids, batch = self.inputs(images, prompt, budget, messages)
            return input_ids, self.model.embed(input_ids, batch)
        choice = self.auto_choice(images, prompt, messages, auto_tolerance(budget))
        lowest = self.geometry.levels[0]
        again = [index for index, chosen in enumerate(choice.budgets) if chosen != lowest]
        if not again:
            return choice.input_ids, self.model.embed(choice.input_ids, choice.batch, visual=choice.visual)
        input_ids, batch = self.inputs(images, prompt, choice.budgets, messages)
        encoded = self.model.encode_images(batch.select(again)).split(batch.token_counts[again].tolist())
        visual = dict(zip(again, encoded, strict=True))
        reused = choice.visual.split(choice.batch.token_counts.tolist())
        tokens = torch.cat([visual.get(index, reused[index]) for index in range(len(images))])
        return input_ids, self.model.embed(input_ids, batch, visual=tokens)

    def inputs(
        self,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        budget: int | str | Sequence[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> tuple[torch.Tensor, ImageBatch]:
        """Token ids of the prompt, or of ``messages`` through the chat template up to the assistant's next
        turn, with each image's placeholders; and the images cut at their budgets."""
        if prompt is not None and messages is not None:
            raise ValueError("give a prompt or messages, not both")
        if isinstance(budget, str):
            budget = self.auto_budgets(images, prompt, messages, auto_tolerance(budget))
        device = next(self.model.parameters()).device
        batch = ImageBatch.of_images(images, self.description.default_budget if budget is None else budget, self.geometry)
        counts = batch.token_counts.tolist()
        if messages is not None:
            stored, _, _ = parse_messages(messages)
            check_conversation(stored, len(images), answered=False)
            ids = self.text.encode_chat_prompt(stored, counts)
        else:
            ids = self.text.encode_prompt(self.text_format.prompt if prompt is None else prompt, counts)
        return torch.tensor([ids], device=device), batch.to(device)

    @torch.no_grad()
    def logits(
        self,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        budget: int | str | Sequence[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``(1, L, vocab)`` for the prompt (or conversation) with the images."""
        input_ids, embeds = self.embeddings(images, prompt, budget, messages)
        return self.model.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        budget: int | str | Sequence[int] | None = None,
        max_new_tokens: int = 64,
        messages: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Greedy (or ``kwargs``-configured) continuation of the prompt, or the assistant's next turn in
        ``messages`` (``role``/``content`` turns, ``<image>`` markers or image parts placing the images), as
        text. One budget per image, or one for all, or ``"auto"`` / ``"auto:TOL"``: the budget selector's
        choice for each image (:meth:`auto_budgets`)."""
        input_ids, embeds = self.embeddings(images, prompt, budget, messages)
        settings = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": stop_tokens(self.tokenizer, self.description.lm.image_token)
            if messages is not None
            else self.tokenizer.eos_token_id,
            **kwargs,
        }
        output = self.model.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), **settings)
        return self.tokenizer.decode(output[0], skip_special_tokens=True)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: missing (not a complete vlmtrain export)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON: {error}") from None


def read_export(path: Path) -> tuple[ModelDescription, TextConfig, str]:
    """The description, text format and layout (where the weights are) of the export at ``path``, the
    description checked against the copy kept in its weights files."""
    config_file = path / VISION_DIR / CONFIG_FILE
    config = _read_json(config_file)
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise UserError(f"{config_file}: format {found!r} is not {EXPORT_FORMAT!r} (not an export of this vlmtrain version)")
    for key in ("model", "text"):
        if key not in config:
            raise UserError(f"{config_file}: {key}: missing")
    description = read_description(config["model"], str(config_file), "model.")
    try:
        text = structured(TextConfig, [config["text"]], str(config_file), "text.")
    except RecipeError as error:
        raise UserError(str(error)) from None
    layout = config.get("layout", VLMTRAIN_LAYOUT)
    if layout not in (VLMTRAIN_LAYOUT, GEMMA4_LAYOUT):
        raise UserError(f"{config_file}: layout {layout!r} is not {VLMTRAIN_LAYOUT!r} or {GEMMA4_LAYOUT!r}")
    if layout == VLMTRAIN_LAYOUT:
        weights_file = path / VISION_DIR / WEIGHTS_FILE
    else:  # a native checkpoint: every shard keeps the description
        weights_file = min(path.glob("*.safetensors"), default=path / WEIGHTS_FILE)
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: missing (not a complete vlmtrain export)")
    with safe_open(str(weights_file), framework="pt") as handle:
        stored = (handle.metadata() or {}).get(DESCRIPTION_KEY)
    if stored is None:
        raise UserError(f"{weights_file}: holds no model description (not written by vlmtrain export)")
    difference = first_difference(description.to_dict(), json.loads(stored))
    if difference is not None:
        key, found, expected = difference
        raise UserError(
            f"{config_file}: model.{key} is {found!r}, but the weights were exported with {expected!r}; "
            "the config was edited after export (restore it, or export again)"
        )
    return description, text, layout


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ExportedModel:
    """Load an export folder for inference (no Lightning, no DeepSpeed, no pickle)."""
    path = Path(path)
    description, text, layout = read_export(path)
    lm = description.lm
    for folder in filter(None, (lm.path, lm.adapter)):
        if not (path / folder).is_dir():
            raise UserError(f"{path / folder}: missing (not a complete vlmtrain export)")
    local = replace(description, lm=replace(lm, path=str(path / lm.path), adapter=str(path / lm.adapter) if lm.adapter else None))
    tokenizer = lm_tokenizer(local.lm)
    with torch.random.fork_rng(devices=[]):  # building seeds torch's generator; the caller's stays as it was
        model = build_model(local, tokenizer)
    if layout == GEMMA4_LAYOUT:
        weights = vlmtrain_weights(path, VISION_PARTS)
    else:
        weights = load_file(path / VISION_DIR / WEIGHTS_FILE)
    for name in VISION_PARTS:
        part = getattr(model, name)
        state = {key[len(name) + 1 :]: value for key, value in weights.items() if key.startswith(name + ".")}
        expected = part.state_dict()
        misfits = sorted(
            (expected.keys() ^ state.keys())
            | {key for key in state.keys() & expected.keys() if state[key].shape != expected[key].shape}
        )
        if misfits:
            raise UserError(f"{path}: weights {name}.{misfits[0]} do not fit the described model")
        part.load_state_dict(state)
    exported = ExportedModel(model.to(device=device, dtype=dtype), tokenizer, description, text)
    if (path / SELECTOR_DIR).is_dir():
        exported.selector = load_selector(path / SELECTOR_DIR, list(description.levels)).to(device)
    return exported
