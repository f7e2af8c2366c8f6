"""Using a model: an export folder (:func:`load`, without Lightning or DeepSpeed: weights come from safetensors
and settings from JSON only, never from a pickle) or a run directory (:func:`open_run`), as one
:class:`ExportedModel` that prepares images at any budget (one per image, or the selector's choice), gives
logits, generates, and offers evaluation its steps (losses, prefill, generation from embeddings).

The export's ``vision/config.json`` holds the model description (:mod:`vlmtrain.model.description`), which
is built through the same builder as in training; the weights files keep their own copy of the description,
so a config edited after export is refused, naming the key, instead of computing something else
(:mod:`vlmtrain.export.format`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import DecodingConfig, TextConfig, VideoConfig
from vlmtrain.data.samples import RawSample
from vlmtrain.data.video import decoded_images, placeholder_kinds, probe_video, with_frames
from vlmtrain.errors import UserError
from vlmtrain.export.format import CONFIG_FILE, SELECTOR_DIR, VISION_DIR, VISION_PARTS, TextFormat
from vlmtrain.export.layouts import read_export
from vlmtrain.export.run import trained_model
from vlmtrain.families import build_model, frame_layout
from vlmtrain.model.config import LMConfig
from vlmtrain.model.description import ModelDescription, Start
from vlmtrain.model.lm import lm_tokenizer
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.inputs import ImageBatch, ModelInput
from vlmtrain.modeling.vlm import SampleLosses, VisionLanguageModel
from vlmtrain.selector.model import BudgetSelector, batch_features, load_selector, question_embedding, selector_features
from vlmtrain.text.chat import stop_tokens
from vlmtrain.text.conversation import check_conversation, parse_messages, record_video_budgets
from vlmtrain.text.encoding import TextEncoder
from vlmtrain.train.layout import RECIPE_FILE

VideoInput = str | Path | bytes | Sequence[Image.Image | str | Path]  # a video file (or its bytes), or its frames in order


@dataclass(frozen=True)
class Prompt:
    """A prompt as the LM takes it: its ids ``(1, L)``, its input embeddings (images spliced in), its 3-D
    positions for an LM with multimodal RoPE (None: the LM counts positions itself), and what else the LM takes
    of its images (:meth:`VisionLanguageModel.embed`)."""

    input_ids: torch.Tensor
    embeds: torch.Tensor
    positions: torch.Tensor | None = None
    visual_inputs: dict[str, Any] = field(default_factory=dict)  # what else the LM takes of the images (Qwen3-VL's DeepStack)


AUTO_TOLERANCE = 0.05  # budget="auto": the loss gap (nats per target token) a smaller budget may cost


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


def video_with_facts(video: VideoInput) -> tuple[bytes | list[Image.Image], dict[str, Any]]:
    """A requested video as training stores one: a file's bytes with its facts, or its frames (images, or
    image files) with their sizes."""
    if isinstance(video, (str, Path, bytes)):
        data = video if isinstance(video, bytes) else Path(video).read_bytes()
        return data, probe_video(data)
    frames = [frame if isinstance(frame, Image.Image) else Image.open(frame).convert("RGB") for frame in video]
    return frames, {"images": [{"width": frame.width, "height": frame.height} for frame in frames], "frames": len(frames)}


class ExportedModel:
    """A model ready for use: prepare images at any budget (one per image), get logits, generate text."""

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer: PreTrainedTokenizerBase,
        description: ModelDescription,
        text: TextFormat,
        video: VideoConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.description = description
        self.text_format = text
        self.video = video or VideoConfig()  # how training sampled a video's frames: requests are sampled alike
        self.frames = frame_layout(description, tokenizer)  # and how its family writes them
        self.text = TextEncoder(tokenizer, description.lm.image_token, self.frames.token)
        self.selector: BudgetSelector | None = None  # set by load() when the export has one

    @property
    def geometry(self) -> Geometry:
        return self.model.geometry

    def batch_builder(self, fields: TextConfig, geometry: Geometry | None = None) -> BatchBuilder:
        """How evaluation and budget labelling turn samples into this model's batches: as training did (its text,
        video sampling and frame layout), every image decoded fast whatever its size (``geometry``: other levels)."""
        decoding = DecodingConfig(fast=True, max_image_pixels=10**9)
        return BatchBuilder(geometry or self.geometry, self.text, fields, decoding, self.video, self.frames)

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
        ids = input_ids[0]
        question = question_embedding(self.model.lm.get_input_embeddings(), ids, self.model.placeholders(ids))
        features = selector_features(self.model.visual_parts(visual)[0].float(), batch.token_counts, question)
        budgets = selector.choose(features, tolerance)
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
        videos: Sequence[VideoInput] = (),
    ) -> Prompt:
        """The prompt as the LM takes it. With ``budget="auto[:TOL]"`` the selector's pass at the lowest level is
        reused for the images it leaves there: only the others go through the encoder again."""
        if not isinstance(budget, str):
            input_ids, batch = self.inputs(images, prompt, budget, messages, videos)
            return self._prompt(input_ids, batch)
        if videos:
            raise UserError(f"budget {budget!r}: the selector chooses image budgets; with videos give a level or a list")
        choice = self.auto_choice(images, prompt, messages, auto_tolerance(budget))
        lowest = self.geometry.levels[0]
        again = [index for index, chosen in enumerate(choice.budgets) if chosen != lowest]
        if not again:
            return self._prompt(choice.input_ids, choice.batch, choice.visual)
        input_ids, batch = self.inputs(images, prompt, choice.budgets, messages)
        encoded = self.model.encode_images(batch.select(again)).split(batch.token_counts[again].tolist())
        visual = dict(zip(again, encoded, strict=True))
        reused = choice.visual.split(choice.batch.token_counts.tolist())
        return self._prompt(input_ids, batch, torch.cat([visual.get(index, reused[index]) for index in range(len(images))]))

    def _prompt(self, input_ids: torch.Tensor, images: ImageBatch, visual: torch.Tensor | None = None) -> Prompt:
        embeds, visual_inputs = self.model.embed(input_ids, images, visual=visual)
        return Prompt(input_ids, embeds, self.model.rope_positions(input_ids, images), visual_inputs)

    def inputs(
        self,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        budget: int | str | Sequence[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        videos: Sequence[VideoInput] = (),
    ) -> tuple[torch.Tensor, ImageBatch]:
        """Token ids of the prompt, or of ``messages`` through the chat template up to the assistant's next
        turn, with each image's placeholders; and the images cut at their budgets. ``videos`` (files, their
        bytes, or lists of frames, placed by ``<video>`` markers or video parts of ``messages``) are sampled into
        frames as in training (:attr:`video`) and written as the model's family writes them (:attr:`frames`), each
        frame an image at the video budget after its time."""
        if prompt is not None and messages is not None:
            raise ValueError("give a prompt or messages, not both")
        if isinstance(budget, str):
            budget = self.auto_budgets(images, prompt, messages, auto_tolerance(budget))
        budget = self.description.default_budget if budget is None else budget
        stored, kinds, times = None, [], None
        if messages is not None:
            stored, _, _, _, fixed = parse_messages(messages)
            check_conversation(stored, len(images), answered=False, videos=len(videos))
            if videos:
                stored, images, budget, kinds, times = self.video_frames(stored, images, budget, videos, fixed)
        elif videos:
            raise ValueError("videos go in messages (a <video> marker or a video part places each)")
        device = self.device
        batch = ImageBatch.of_images(images, budget, self.geometry, token_times=times)
        counts = batch.token_counts.tolist()
        if stored is not None:
            ids = self.text.encode_chat_prompt(stored, counts, kinds)
        else:
            ids = self.text.encode_prompt(self.text_format.prompt if prompt is None else prompt, counts)
        return torch.tensor([ids], device=device), batch.to(device)

    def video_frames(
        self,
        stored: list[dict[str, Any]],
        images: Sequence[Image.Image],
        budget: int | Sequence[int],
        videos: Sequence[VideoInput],
        fixed: Sequence[dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], list[Image.Image | tuple[Image.Image, ...]], list[int], list[int], list[int]]:
        """The stored messages with each video part replaced by its sampled frames and their times, every image and
        frame (or unit of frames) in order, the budget of each (the images' ``budget``, the frames' their video
        part's ``budget`` and ``key_frames``, ``fixed``, else the video budget), what each is in the text and its
        M-RoPE time in its block (:func:`placeholder_kinds`)."""
        budgets = [budget] * len(images) if isinstance(budget, int) else list(budget)
        fixed = record_video_budgets({}, len(videos), list(fixed))
        given = [(data, facts | what) for (data, facts), what in zip(map(video_with_facts, videos), fixed, strict=True)]
        sample = RawSample(
            "request", {"messages": stored}, list(images), [(image.height, image.width) for image in images], budgets=budgets,
            videos=given,
        )
        sample = with_frames(sample, self.video, self.frames)
        sizes = [self.geometry.image(h, w, b).resize for (h, w), b in zip(sample.sizes, sample.budgets, strict=True)]
        frames = decoded_images(sample.images, sizes, lambda image, _: image)
        budgets = [self.video.budget if b is None else int(b) for b in sample.budgets]  # drawn in training: the default here
        return sample.messages, frames, budgets, placeholder_kinds(sample), sample.token_times

    @torch.no_grad()
    def logits(
        self,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        budget: int | str | Sequence[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        videos: Sequence[VideoInput] = (),
    ) -> torch.Tensor:
        """Next-token logits ``(1, L, vocab)`` for the prompt (or conversation) with the images (and videos:
        :meth:`inputs`)."""
        return self._logits(self.embeddings(images, prompt, budget, messages, videos))

    def _logits(self, prompt: Prompt) -> torch.Tensor:
        """The LM's logits for a prepared prompt (its embeddings and positions)."""
        mask = torch.ones_like(prompt.input_ids)
        output = self.model.lm(
            inputs_embeds=prompt.embeds, attention_mask=mask, position_ids=prompt.positions, use_cache=False,
            **prompt.visual_inputs,
        )
        return output.logits

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        budget: int | str | Sequence[int] | None = None,
        max_new_tokens: int = 64,
        messages: list[dict[str, Any]] | None = None,
        videos: Sequence[VideoInput] = (),
        **kwargs: Any,
    ) -> str:
        """Greedy (or ``kwargs``-configured) continuation of the prompt, or the assistant's next turn in
        ``messages`` (``role``/``content`` turns, ``<image>`` and ``<video>`` markers or parts placing the images
        and ``videos``), as text. One budget per image, or one for all, or ``"auto"`` / ``"auto:TOL"``: the
        budget selector's choice for each image (:meth:`auto_budgets`); a video's frames at the video budget."""
        prepared = self.embeddings(images, prompt, budget, messages, videos)
        return self.continue_from(prepared, messages is not None, max_new_tokens, **kwargs)

    @torch.no_grad()
    def continue_from(self, prompt: Prompt, chat: bool, max_new_tokens: int = 64, **kwargs: Any) -> str:
        """The greedy (or ``kwargs``-configured) continuation of a prompt (:meth:`embeddings`, :meth:`prefill`): up
        to the end of the assistant's turn for a conversation (``chat``), else up to EOS."""
        settings = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": stop_tokens(self.tokenizer, self.description.lm.image_token) if chat else self.tokenizer.eos_token_id,
            **kwargs,
        }
        positions = {"position_ids": prompt.positions} if prompt.positions is not None else {}
        output = self.model.lm.generate(
            inputs_embeds=prompt.embeds, attention_mask=torch.ones_like(prompt.input_ids), **positions, **prompt.visual_inputs,
            **settings,
        )
        return self.tokenizer.decode(output[0], skip_special_tokens=True)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, images: ImageBatch) -> Prompt:
        """A prompt's ids ``(1, L)`` and its images through the encoder and the LM (what answering costs before
        its first token); returns the prompt, to continue from (:meth:`continue_from`)."""
        prompt = self._prompt(input_ids, images)
        self._logits(prompt)
        return prompt

    @torch.no_grad()
    def selector_features(self, inputs: ModelInput) -> list[torch.Tensor]:
        """The budget selector's features of each sample of a batch (its images at the lowest level)."""
        return batch_features(self.model, inputs)

    @torch.no_grad()
    def sample_losses(self, inputs: ModelInput) -> SampleLosses:
        """Per sample: target-token loss sum, target tokens and tokens predicted right (teacher forcing)."""
        return self.model.sample_losses(inputs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ExportedModel:
    """Load an export folder for inference (no Lightning, no DeepSpeed, no pickle)."""
    path = Path(path)
    config, layout = read_export(path)
    description = config.model
    lm = LMConfig(
        path=str(path / layout.lm_folder),
        adapter=str(path / config.adapter) if config.adapter else None,
        image_token=description.lm.image_token,
        attn_implementation=description.lm.attn_implementation,
    )
    tokenizer = lm_tokenizer(lm)
    with torch.random.fork_rng(devices=[]):  # building seeds torch's generator; the caller's stays as it was
        model = build_model(description, Start(lm), tokenizer)
    weights = layout.vision_weights(path)
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
    exported = ExportedModel(model.to(device=device, dtype=dtype), tokenizer, description, config.text, config.video)
    if (path / SELECTOR_DIR).is_dir():
        exported.selector = load_selector(path / SELECTOR_DIR, list(description.levels)).to(device)
    return exported


def open_run(path: Path) -> ExportedModel:
    """A run directory (its latest checkpoint) or a checkpoint, as a model ready for use."""
    trained = trained_model(path)
    return ExportedModel(trained.model, trained.tokenizer, trained.description, trained.text_format, trained.recipe.data.video)


def open_model(path: Path) -> ExportedModel:
    """An export folder, or a run directory (its latest checkpoint), ready for use."""
    if (path / VISION_DIR / CONFIG_FILE).is_file():
        return load(path)
    if (path / RECIPE_FILE).is_file():
        return open_run(path)
    raise UserError(f"{path}: neither an export folder (vision/config.json) nor a run directory (recipe.yaml)")
