"""The Qwen-VL families, Qwen2.5-VL and Qwen3-VL: models with the family's vision tower (its patch merger
included), and whole checkpoints of the family, whose language model (``model.language_model.*`` and ``lm_head``)
is read as the family's text model with its multimodal RoPE positions (:mod:`vlmtrain.modeling.qwen_lm`). Their
geometry is the tower kind's (``smart_resize``, :mod:`vlmtrain.modeling.backbones`).

A model whose parts are all the family's (the tower, the ``tower`` pooling and ``identity`` projector, the family's
text model, a tokenizer with Qwen's vision tokens) exports as a native checkpoint of the family
(``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``) with Qwen's image processor, no remote
code; the budget is the image processor's ``max_pixels`` (``size.longest_edge`` = budget × cell², the cell being
patch × merge: 28 for Qwen2.5-VL, 32 for Qwen3-VL), the default budget its default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import transformers
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmtrain.data.config import VideoConfig
from vlmtrain.families.assembled import Family
from vlmtrain.families.native import NativeCheckpoint
from vlmtrain.model.description import ModelDescription
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.geometry import LEVELS
from vlmtrain.modeling.prompt import FRAMES_AS_IMAGES, QWEN_IMAGE, QWEN_VIDEO, FrameLayout
from vlmtrain.modeling.vlm import VisionLanguageModel

# vlmtrain's names (VisionLanguageModel's state dict, LoRA merged) → the family's ForConditionalGeneration's
NATIVE_NAMES = (
    ("backbone.model.", "model.visual."),
    ("lm.model.", "model.language_model."),
    ("lm.lm_head.", "lm_head."),
)


@dataclass(frozen=True)
class QwenVLSpec:
    """What tells the Qwen-VL families apart: names (the tower kind's and the whole checkpoint's model_type), the
    side of one token's square of pixels in its releases (patch × merge), the transformers config and model
    classes, the text model's model_type, the processor class, and its video processor: its class, how it spreads
    the frames it samples (:attr:`FrameLayout.sampling`), and whether its processor writes a video as
    Qwen3-VL's does (each temporal patch after its time, in its own vision block of video tokens)."""

    name: str
    title: str
    cell: int
    config_class_name: str
    architecture: str
    text_model_type: str
    processor_class: str
    video_processor_class: str
    video_sampling: str
    timed_video_blocks: bool = False

    @property
    def min_pixels(self) -> int:
        """The smallest image area its processor leaves (the tower kind's)."""
        return BACKBONES[self.name].spec.min_pixels  # type: ignore[attr-defined]


class QwenVLLayout(NativeCheckpoint):
    """An export as a native checkpoint of a Qwen-VL family at the folder's root."""

    names = NATIVE_NAMES

    def __init__(self, spec: QwenVLSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.title = spec.title
        self.summary = f"a native {spec.title} checkpoint ({spec.architecture}, Qwen's image processor, no remote code)"
        self.card_summary = f"- the folder is a native {spec.title} checkpoint (`{spec.architecture}`)"
        self.budget_name = f"the image processor's `max_pixels`, budget x {spec.cell} x {spec.cell}"

    def config(self, description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
        """The checkpoint's config: the tower's and the LM's own, the tokenizer's vision token ids."""
        image, start, end = (tokenizer.convert_tokens_to_ids(token) for token in QWEN_IMAGE)
        config = getattr(transformers, self.spec.config_class_name)(
            text_config=lm.config.to_dict(),
            vision_config=dict(description.vision.settings),
            image_token_id=image,
            vision_start_token_id=start,
            vision_end_token_id=end,
            tie_word_embeddings=getattr(lm.config, "tie_word_embeddings", False),
            video_token_id=tokenizer.convert_tokens_to_ids(QWEN_VIDEO),
        )
        config.architectures = [self.spec.architecture]
        config.dtype = lm.config.dtype
        return config

    def processor_files(
        self, description: ModelDescription, model: VisionLanguageModel, video: VideoConfig
    ) -> dict[str, dict[str, Any]]:
        """``preprocessor_config.json``: Qwen's image processor, its default ``max_pixels`` the default budget's;
        ``video_preprocessor_config.json``: the family's video processor sampling frames as training did (``video``:
        ``fps`` a second, at least one temporal patch, at most the frames training takes), each frame at most the
        video budget's pixels (Qwen3-VL's per-frame cap, ``max_video_tokens``; Qwen2.5-VL's ``longest_edge``)."""
        geometry, normalisation = model.geometry, model.backbone.normalisation
        shared = {
            "patch_size": geometry.patch_size, "merge_size": geometry.pool, "image_mean": list(normalisation[0]),
            "image_std": list(normalisation[1]), "processor_class": self.spec.processor_class,
        }
        processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": geometry.min_pixels, "longest_edge": description.default_budget * geometry.cell**2},
            **{name: value for name, value in shared.items() if name != "processor_class"},
        )
        values = json.loads(processor.to_json_string()) | shared
        values["image_processor_type"] = "Qwen2VLImageProcessor"  # transformers picks the backend it has
        frame_pixels, most = video.budget * geometry.cell**2, video.frames(video.budget, geometry.frames)
        per_frame = (  # Qwen3-VL caps each frame by max_video_tokens; Qwen2.5-VL by longest_edge
            {"cap_pixels_per_frame": True, "max_video_tokens": video.budget, "longest_edge": frame_pixels * most}
            if self.spec.timed_video_blocks
            else {"cap_pixels_per_frame": False, "longest_edge": frame_pixels}
        )
        videos = shared | {
            "video_processor_type": self.spec.video_processor_class, "temporal_patch_size": geometry.frames,
            "do_sample_frames": True, "fps": video.fps, "min_frames": geometry.frames, "max_frames": most,
            "size": {"shortest_edge": geometry.min_pixels, "longest_edge": per_frame.pop("longest_edge")}, **per_frame,
        }
        return {"preprocessor_config.json": values, "video_preprocessor_config.json": videos}

    def budget_kwargs(self, budget: int) -> str:
        cell = self.spec.cell
        return f'{{"size": {{"shortest_edge": {self.spec.min_pixels}, "longest_edge": {budget} * {cell} * {cell}}}}}'


class QwenVLFamily(Family):
    """Every model with the family's vision tower, built as assembled models are; its LM may be a whole checkpoint's
    of the family; exported natively when all its parts are the family's."""

    def __init__(self, spec: QwenVLSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.title = spec.title
        self.checkpoint_lms = {spec.name: {r"^model\.language_model\.": "model."}}
        self.native_layout = QwenVLLayout(spec)

    def concerns(self, description: ModelDescription) -> bool:
        return description.vision.kind == self.name

    def frame_layout(self, description: ModelDescription, tokenizer: PreTrainedTokenizerBase) -> FrameLayout:
        """The family's processors' layout where the model reads Qwen's vision tokens, each temporal patch (two
        consecutive frames) a set of ``<|video_pad|>`` tokens: Qwen3-VL's each after ``<t seconds>`` in its own
        ``<|vision_start|>…<|vision_end|>`` block; Qwen2.5-VL's all in one block, their time in their M-RoPE positions
        (its tower's ``tokens_per_second``). Without Qwen's tokens, frames are images as in an assembled model."""
        qwen_tokens = description.lm.image_token == QWEN_IMAGE[0] and QWEN_VIDEO in tokenizer.get_vocab()
        if not qwen_tokens:
            return FRAMES_AS_IMAGES
        frames = description.geometry().frames
        if self.spec.timed_video_blocks:
            return FrameLayout(frames=frames, stamp="seconds", token=QWEN_VIDEO, sampling=self.spec.video_sampling)
        rate = float(description.vision.settings["tokens_per_second"])
        return FrameLayout(
            frames=frames, stamp="none", token=QWEN_VIDEO, joined=True, tokens_per_second=rate, sampling=self.spec.video_sampling
        )

    def checkpoint_recipe(self, path: str) -> dict[str, Any]:
        return {
            "model": {
                "vision": {"backbone": self.name, "path": path, "patch_size": None},
                "pooling": {"kind": "tower", "size": None},
                "projector": {"kind": "identity"},
                "lm": {"path": path, "hf_config": None, "image_token": QWEN_IMAGE[0]},
            },
            "data": {"text": {"prompt": QWEN_IMAGE[0]}},
        }

    def native_mismatch(
        self, description: ModelDescription, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> str | None:
        """Why the described model cannot be a native checkpoint of the family, in a few words; None when it can."""
        vocabulary, text_model = tokenizer.get_vocab(), self.spec.text_model_type
        checks = (
            (description.pooling.kind == "tower", f"model.pooling.kind is {description.pooling.kind}, not tower"),
            (description.projector.kind == "identity", f"model.projector.kind is {description.projector.kind}, not identity"),
            (lm.config.model_type == text_model, f"the language model is {lm.config.model_type}, not {text_model}"),
            (set(description.levels) <= set(LEVELS), f"levels {description.levels} are not all vlmtrain's"),
            (description.lm.image_token == QWEN_IMAGE[0], f"the image token is not {QWEN_IMAGE[0]!r}"),
            (all(token in vocabulary for token in QWEN_IMAGE), f"the tokenizer lacks Qwen's {', '.join(QWEN_IMAGE)}"),
            (QWEN_VIDEO in vocabulary, f"the tokenizer lacks Qwen's {QWEN_VIDEO} (vLLM's Qwen processors look it up)"),
        )
        return next((reason for ok, reason in checks if not ok), None)


QWEN2_5_VL = QwenVLFamily(QwenVLSpec(
    "qwen2_5_vl", "Qwen2.5-VL", 28, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl_text",
    "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", "stride",
))
QWEN3_VL = QwenVLFamily(QwenVLSpec(
    "qwen3_vl", "Qwen3-VL", 32, "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "qwen3_vl_text", "Qwen3VLProcessor",
    "Qwen3VLVideoProcessor", "linspace", timed_video_blocks=True,
))
