"""A prompt with image markers as token ids, each marker expanded to its image's placeholder tokens.

Used by training's text encoder and by every exported model's processor, so that a prompt becomes the same
ids everywhere; depends on transformers only (an export ships this file)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy
import torch
from transformers import PreTrainedTokenizerBase

QWEN_IMAGE = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")  # Qwen-VL: an image's placeholder and bounds
QWEN_VIDEO = "<|video_pad|>"  # Qwen-VL's video placeholder: its native exports name its id (vLLM looks the token up)
VIDEO_MARKER = "<video>"  # where a video goes in a prompt (LLaMA-Factory's marker)


@dataclass(frozen=True)
class FrameLayout:
    """How a model's text holds a video, as its family's processor writes it: the frames that share one set of
    visual tokens (``frames``: Qwen-VL's temporal patch), the time written before each such unit (``"mm:ss"``:
    ``00:03`` after a space from the second on, as Gemma 4 writes frames; ``"seconds"``: ``<1.5 seconds>``, as
    Qwen3-VL does; ``"none"``), the token that holds a unit's place (None: the image token), and whether a video's
    units share one vision block, their time told by their M-RoPE positions instead, ``tokens_per_second`` of them
    (``joined``: Qwen2.5-VL); and how its video processor spreads the n frames it samples over a video of N
    (``sampling``, as transformers 5.25 does: ``"spread"``, frame i × N // n, its default_sample_indices_fn and Gemma
    4's; ``"linspace"``, n frames from 0 to N - 1 rounded, Qwen3-VL's; ``"stride"``, a whole number of units, N / n
    apart from 0 rounded down, Qwen2-VL's and Qwen2.5-VL's)."""

    frames: int = 1
    stamp: str = "mm:ss"
    token: str | None = None
    joined: bool = False
    tokens_per_second: float = 0.0
    sampling: str = "spread"

    def stamp_text(self, seconds: float, first: bool) -> str:
        """The text before a unit at ``seconds`` (the mean of its frames' times); ``first``: the video's first unit."""
        if self.stamp == "seconds":
            return f"<{seconds:.1f} seconds>"
        if self.stamp == "none":
            return ""
        return f"{'' if first else ' '}{int(seconds // 60):02d}:{int(seconds % 60):02d} "

    def token_time(self, unit: int, sampled_fps: float) -> int:
        """The M-RoPE time of a joined video's ``unit``-th unit in its block: ``tokens_per_second`` × the seconds of
        video per unit (Qwen2.5-VL's processor's ``second_per_grid_ts``: ``frames`` / ``sampled_fps``, the frames it
        sampled per second of the video, not the rate asked for) × ``unit``, in float32 and rounded down as
        transformers computes it; :data:`OPENS` for a unit that opens a block (the first, or any when units are not
        joined)."""
        if not (self.joined and unit):
            return OPENS
        interval = numpy.float32(self.tokens_per_second) * numpy.float32(self.frames / sampled_fps)
        return int(numpy.float32(unit) * interval)

    def units(self, times: Sequence[float], sampled_fps: float) -> list[tuple[int, int, str, int]]:
        """Each unit of a video's frames sampled at ``times`` (seconds; ``sampled_fps`` of them per second of the
        video): its first frame and the frame after its last, the text before it (:meth:`stamp_text` at the mean of
        its frames' times) and its M-RoPE time in its block (:meth:`token_time`)."""
        bounds = [(start, min(start + self.frames, len(times))) for start in range(0, len(times), self.frames)]
        return [
            (start, stop, self.stamp_text((times[start] + times[stop - 1]) / 2, start == 0), self.token_time(unit, sampled_fps))
            for unit, (start, stop) in enumerate(bounds)
        ]

    def frame_indices(self, total: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
        """The indices of the frames of a video of ``total`` frames at ``native_fps`` that the family's video
        processor samples (:attr:`sampling`) when asked for ``fps`` frames a second, at least one unit and at most
        ``max_frames``: ``fps`` a second, spread over the whole video when that would be more than ``max_frames``,
        never more than the video has. A frame's time is its index / ``native_fps``, as the processors stamp it."""
        count = min(max(int(total / native_fps * fps), self.frames), max_frames, total)
        if self.sampling == "stride":
            count = max(1, count // self.frames * self.frames)
            return torch.arange(0, total, total / count).int().tolist()
        if self.sampling == "linspace":
            return numpy.linspace(0, total - 1, count).round().astype(int).tolist()
        return [index * total // count for index in range(count)]


def most_frames(
    max_frames: int, max_tokens: int | None, budget: int, levels: Sequence[int] | None = None, per_unit: int = 1
) -> int:
    """The most frames of one video at ``budget`` tokens per unit of ``per_unit`` frames (Qwen-VL's two share their
    tokens; drawn from ``levels``: at the largest of them, so that every draw takes the same frames): ``max_frames``,
    fewer where their units would pass ``max_tokens`` (None: no cap)."""
    largest = max(levels) if levels else budget
    by_tokens = max_frames if max_tokens is None else max(1, max_tokens // largest) * per_unit
    return max(1, min(max_frames, by_tokens))


def with_key_frames(
    indices: Sequence[int], key_frames: Sequence[dict], rate: float, total: int
) -> list[tuple[int, int | None]]:
    """The sampled frames' ``indices`` with each key frame (``{"time", "budget"}``: the frame at time × ``rate``,
    rounded; past the end, the last) in place of the sampled frame nearest it that is no key frame itself (beside
    them when all are), ascending, each with the budget its key frame fixes (None: the video's)."""
    picked: dict[int, int | None] = dict.fromkeys(indices)
    for key in key_frames:
        index = min(total - 1, round(key["time"] * rate))
        free = [sampled for sampled, budget in picked.items() if budget is None and sampled != index]
        if index not in picked and free:
            del picked[min(free, key=lambda sampled: abs(sampled - index))]
        picked[index] = max(picked.get(index) or 0, int(key["budget"]))
    return sorted(picked.items())


FRAMES_AS_IMAGES = FrameLayout()  # the default: each frame an image after its mm:ss time, as Gemma 4 writes them


def image_bounds(tokenizer: PreTrainedTokenizerBase, image_token: str) -> tuple[list[int], list[int]]:
    """The ids that open and close each image's placeholders, what the family's processor writes around an
    image (so a model trains on the layout it is served with): the tokenizer's ``boi_token`` and ``eoi_token``
    when it declares them and ``image_token`` is its own image token (Gemma 3 and 4); ``<|vision_start|>`` and
    ``<|vision_end|>`` around Qwen-VL's ``<|image_pad|>``; none otherwise."""
    boi, eoi = getattr(tokenizer, "boi_token", None), getattr(tokenizer, "eoi_token", None)
    if image_token == QWEN_IMAGE[0] and all(token in tokenizer.get_vocab() for token in QWEN_IMAGE[1:]):
        boi, eoi = QWEN_IMAGE[1:]
    elif boi is None or eoi is None or getattr(tokenizer, "image_token", None) != image_token:
        return [], []
    return [tokenizer.convert_tokens_to_ids(boi)], [tokenizer.convert_tokens_to_ids(eoi)]


OPENS = -1  # the M-RoPE time of an image, or a video unit, that opens its own vision block
IMAGE, FRAME, NEXT_FRAME = 0, 1, 2  # a span of placeholders: an image, a video's unit opening its block, one continuing it


def unit_kind(time: int) -> int:
    """What a video's unit is in the text, by its M-RoPE time in its block: one that opens its block (:data:`FRAME`)
    or one that continues the block its video's previous unit opened (:data:`NEXT_FRAME`)."""
    return FRAME if time == OPENS else NEXT_FRAME


def image_span(
    bounds: tuple[list[int], list[int]], image_token_id: int, count: int, opens: bool = True, closes: bool = True
) -> list[int]:
    """One image in a token sequence: its ``count`` placeholders inside its bounds (:func:`image_bounds`); a joined
    video's units share one pair of bounds (``opens``, ``closes``)."""
    return [*(bounds[0] if opens else []), *[image_token_id] * count, *(bounds[1] if closes else [])]


def placeholder_span(
    bounds: tuple[list[int], list[int]], token_ids: tuple[int, int], counts: Sequence[int], kinds: Sequence[int], index: int
) -> list[int]:
    """The ``index``-th image of a sample in its token sequence: ``counts[index]`` placeholders, the image token or,
    for a video's unit, the video token (``token_ids``: both), in their bounds unless ``kinds`` (:data:`IMAGE`,
    :data:`FRAME`, :data:`NEXT_FRAME` per image) say its video's units share them (:func:`image_span`)."""
    kind = kinds[index]
    closes = index + 1 == len(kinds) or kinds[index + 1] != NEXT_FRAME
    return image_span(bounds, token_ids[kind != IMAGE], counts[index], kind != NEXT_FRAME, closes)


class TextError(ValueError):
    """A sample whose text cannot be encoded (its image markers, its chat template); the pipeline skips and
    counts it."""


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    image_token: str,
    image_token_id: int,
    image_tokens: Sequence[int],
    tokenize: Callable[[str], Sequence[int]] | None = None,
    kinds: Sequence[int] = (),
    video_token_id: int | None = None,
) -> list[int]:
    """The prompt's token ids (after a BOS token when the tokenizer has one and the prompt does not start
    with it, as chat templates do); image ``i`` becomes ``image_tokens[i]`` placeholders, a video's unit as
    ``kinds[i]`` says in ``video_token_id`` ones (:func:`placeholder_span`).

    Several markers in ``prompt`` place the images one for one; a single marker (or none: the front)
    stands for all of the sample's images in order, so one template serves samples with 0, 1 or many.
    Text between markers is tokenized piece by piece (``tokenize``: the tokenizer without special tokens).
    Raises :class:`TextError` when markers and images cannot be matched.
    """
    tokenize = tokenize or (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])
    image_tokens = list(image_tokens)
    pieces = prompt.split(image_token)
    if len(pieces) - 1 != len(image_tokens):
        if len(pieces) > 2:
            raise TextError(f"prompt has {len(pieces) - 1} image markers for {len(image_tokens)} images")
        before, after = pieces if len(pieces) == 2 else ("", pieces[0])
        pieces = [before] + [""] * (len(image_tokens) - 1) + [after] if image_tokens else [before + after]
    bos = tokenizer.bos_token
    input_ids = [tokenizer.bos_token_id] if bos is not None and not prompt.startswith(bos) else []
    bounds = image_bounds(tokenizer, image_token)
    kinds = list(kinds) or [IMAGE] * len(image_tokens)
    token_ids = (image_token_id, image_token_id if video_token_id is None else video_token_id)
    for index, piece in enumerate(pieces):
        input_ids += tokenize(piece)
        if index < len(image_tokens):
            input_ids += placeholder_span(bounds, token_ids, image_tokens, kinds, index)
    return input_ids

