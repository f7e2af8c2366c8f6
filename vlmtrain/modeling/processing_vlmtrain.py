"""The processor of a vlmtrain model (shipped in every export; imports torch, transformers and PIL only).

A prompt with ``<image>`` markers and its images → the model's inputs: each image resized and cut into
patches at its own budget (``budget``: one for all, or one per image; a budget is a cap on its visual
tokens), each marker expanded to as many image tokens, by vlmtrain's own code shipped beside this file.
``<video>`` markers place videos given as their frames (PIL images, ``video_fps`` a second): the frames the
model's family samples, written as it writes them, as in training, and each video's key frames at their own
budget."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from .geometry import Geometry
from .inputs import ImageBatch
from .prompt import IMAGE, OPENS, VIDEO_MARKER, FrameLayout, TextError, most_frames, prompt_ids, unit_kind, with_key_frames


class VlmtrainProcessor(ProcessorMixin):
    """Prompt, images and videos → ``input_ids``, ``attention_mask`` and the images' patches, positions and grids
    (and, with videos, each unit's M-RoPE time in its video's block)."""

    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        patch_size: int = 16,
        pool: int = 1,
        levels: Sequence[int] = (70, 140, 280, 560, 1120),
        default_budget: int = 280,
        image_token: str = "<image>",
        chat_template: str | None = None,
        rule: str = "fill",
        min_pixels: int = 0,
        frames: int = 1,
        frame_layout: dict[str, Any] | None = None,
        video_fps: float = 2.0,
        video_max_frames: int = 16,
        video_max_tokens: int | None = None,
        video_budget: int = 70,
        video_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(tokenizer, chat_template=chat_template)
        self.patch_size, self.pool, self.levels, self.rule, self.min_pixels = patch_size, pool, list(levels), rule, min_pixels
        self.frames = frames
        self.geometry = Geometry(patch_size, pool, tuple(levels), rule, min_pixels, frames)
        self.default_budget = default_budget
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.frame_layout = frame_layout or {}  # as its config keeps it (the processor's settings are saved as JSON)
        self.video_fps, self.video_max_frames, self.video_max_tokens = video_fps, video_max_frames, video_max_tokens
        self.video_budget, self.video_levels = video_budget, video_levels
        video_token = self.layout.token
        self.video_token_id = self.image_token_id if video_token is None else tokenizer.convert_tokens_to_ids(video_token)

    @property
    def layout(self) -> FrameLayout:
        """How the model's family samples and writes a video's frames."""
        return FrameLayout(**self.frame_layout)

    def __call__(
        self,
        text: str,
        images: Sequence[Image.Image] = (),
        budget: int | Sequence[int] | None = None,
        return_tensors: str = "pt",
        videos: Sequence[Sequence[Image.Image]] = (),
        video_budget: int | None = None,
        key_frames: Sequence[Sequence[dict]] = (),
    ) -> BatchFeature:
        """One prompt and its images (several markers place them one for one; one marker stands for all) and
        videos (each placed by a ``<video>`` marker, every image then by its own marker), each video's frames at
        ``video_budget`` (default: the one it trained at), its ``key_frames`` (one list per video of
        ``{"time": seconds, "budget": level}``, as records give them) at theirs in place of the frame nearest each."""
        budget = self.default_budget if budget is None else budget
        kinds: Sequence[int] = ()
        times = None
        if videos:
            budgets = [budget] * len(images) if isinstance(budget, int) else list(budget)
            keys = list(key_frames) or [[] for _ in videos]
            text, images, budget, kinds, times = self.with_video_frames(text, images, budgets, videos, video_budget, keys)
        batch = ImageBatch.of_images(images, budget, self.geometry, token_times=times)
        counts = batch.token_counts.tolist()
        ids = prompt_ids(self.tokenizer, text, self.image_token, self.image_token_id, counts, None, kinds, self.video_token_id)
        input_ids = torch.tensor([ids])
        features: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if batch.count:
            features |= {
                "pixel_values": batch.pixels,
                "pixel_positions": batch.positions,
                "patch_grids": batch.patch_grids,
                "token_grids": batch.token_grids,
                "image_sample_index": batch.sample_index,
            }
        if batch.token_times is not None:
            features["image_token_times"] = batch.token_times
        return BatchFeature(features, tensor_type=return_tensors)

    def with_video_frames(
        self,
        prompt: str,
        images: Sequence[Image.Image],
        budgets: Sequence[int],
        videos: Sequence[Sequence[Image.Image]],
        video_budget: int | None,
        key_frames: Sequence[Sequence[dict]],
    ) -> tuple[str, list[Image.Image | tuple[Image.Image, ...]], list[int], list[int], list[int]]:
        """The prompt with each ``<video>`` marker replaced by the frames its family samples of that video
        (:meth:`FrameLayout.frame_indices`, ``video_fps`` a second, at most :func:`most_frames`) and its key frames
        (:func:`with_key_frames`) as the family writes them (:meth:`FrameLayout.units`, each unit an image marker
        after its time); every image and unit in order (a unit of several frames as a tuple), their budgets (a unit
        that holds a key frame at its budget), kinds and M-RoPE times."""
        image_token, layout, fps = self.image_token, self.layout, self.video_fps
        video_budget = self.video_budget if video_budget is None else video_budget
        most = most_frames(self.video_max_frames, self.video_max_tokens, video_budget, self.video_levels, layout.frames)
        pieces = re.split(f"({re.escape(image_token)}|{re.escape(VIDEO_MARKER)})", prompt)
        if pieces.count(image_token) != len(images) or pieces.count(VIDEO_MARKER) != len(videos):
            raise TextError(
                f"with videos, markers place every image and video one for one: {pieces.count(image_token)} image "
                f"markers for {len(images)} images, {pieces.count(VIDEO_MARKER)} {VIDEO_MARKER} for {len(videos)} videos"
            )
        text, items, unit_budgets, kinds, times = "", [], [], [], []
        given = iter(zip(images, budgets, strict=True))
        given_videos = iter(zip(videos, key_frames, strict=True))
        for piece in pieces:
            if piece == image_token:
                image, budget = next(given)
                text += piece
                items.append(image)
                unit_budgets.append(budget)
                kinds.append(IMAGE)
                times.append(OPENS)
            elif piece == VIDEO_MARKER:
                video, keys = next(given_videos)
                frames = list(video)
                picked = with_key_frames(layout.frame_indices(len(frames), fps, fps, most), keys, fps, len(frames))
                sampled_fps = len(picked) / len(frames) * fps
                for start, stop, stamp, time in layout.units([index / fps for index, _ in picked], sampled_fps):
                    unit = picked[start:stop]
                    text += stamp + image_token
                    items.append(tuple(frames[index] for index, _ in unit) if layout.frames > 1 else frames[unit[0][0]])
                    unit_budgets.append(max((key for _, key in unit if key is not None), default=video_budget))
                    kinds.append(unit_kind(time))
                    times.append(time)
            else:
                text += piece
        return text, items, unit_budgets, kinds, times

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)
