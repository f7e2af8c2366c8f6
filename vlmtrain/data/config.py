"""The recipe's ``data`` section: where samples come from, how they become text, batches and pixels, and its
rules (:func:`check_data`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtrain.modeling.errors import one_of, positive, require
from vlmtrain.modeling.geometry import LEVELS
from vlmtrain.modeling.prompt import most_frames

TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")


@dataclass
class SourceConfig:
    """A set of shards (spec: paths, brace patterns, ``::`` lists, ``pipe:`` URLs) and its weight."""

    spec: str = ""
    weight: float = 1.0


@dataclass
class TextConfig:
    """How a sample becomes text. A prompt/target record: the prompt (its ``<image>`` markers place the
    images; literal text) or the record field holding it, and the record field holding the target. A
    conversation record (``messages``): the chat template (null: the tokenizer's own; ``chatml``; a file;
    Jinja text) and which assistant turns are trained on. For both: an optional field that groups
    validation results, and the longest text (without image tokens) a sample may have."""

    prompt: str = "<image>"
    prompt_field: str | None = None
    target_field: str = "text"
    group_field: str | None = None
    max_length: int = 64
    chat_template: str | None = None
    train_on: str = "all_assistant_turns"


@dataclass
class BatchingConfig:
    """A step holds at most ``batch_tokens`` LM tokens (visual plus text) and ``max_batch_size`` samples, chosen
    among ``lookahead`` samples read ahead; a sample waits at most ``max_wait`` steps. ``packing``: the samples
    of a step share rows of text (``row_tokens`` each; null: one row) and images of any grid and budget share
    the encoder's packed sequence, nothing padded. Without packing, a step holds one aspect bucket (when
    ``buckets``: images of one token grid) and pads its text to the longest sample."""

    batch_tokens: int = 4608
    max_batch_size: int = 32
    packing: bool = True
    row_tokens: int | None = None
    buckets: bool = True
    lookahead: int = 512
    max_wait: int = 64


@dataclass
class DecodingConfig:
    """``fast``: JPEGs decode at reduced scale when the budget needs far fewer pixels; larger images than
    ``max_image_pixels`` are skipped."""

    fast: bool = True
    max_image_pixels: int = 64_000_000


@dataclass
class VideoConfig:
    """How a video trains: ``fps`` frames a second, at most ``max_frames`` (spread uniformly over a longer
    video), each an image at ``budget`` tokens, or, with ``levels`` (and ``weights``, uniform by default), at a
    budget drawn per video and step from them (a budget a record fixes for its video wins); ``max_tokens`` caps
    one video's visual tokens (null: no cap): a video whose frames would pass it at its largest budget trains
    on fewer frames."""

    fps: float = 2.0
    max_frames: int = 16
    budget: int = 70
    levels: list[int] | None = None
    weights: list[float] | None = None
    max_tokens: int | None = None

    def frames(self, budget: int, per_unit: int = 1) -> int:
        """The most frames one video trains on at ``budget`` tokens (its largest drawn level, if drawn) for each unit
        of ``per_unit`` frames (:func:`~vlmtrain.modeling.prompt.most_frames`)."""
        return most_frames(self.max_frames, self.max_tokens, budget, self.levels, per_unit)


@dataclass
class DataConfig:
    """Where samples come from and how they become batches.

    ``train`` is a shorthand for one source; ``sources`` lists several with weights (weights need
    ``resampled: true``). More than ``max_consecutive_failures`` unusable samples in a row stop the run.
    """

    train: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    resampled: bool = False
    val: str | None = None
    val_samples: int = 32
    num_workers: int = 2
    max_consecutive_failures: int = 1000
    text: TextConfig = field(default_factory=TextConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    video: VideoConfig = field(default_factory=VideoConfig)


def check_data(data: DataConfig) -> None:
    """Every rule of the ``data`` section; raises :class:`InvalidSetting` whose key is relative to it."""
    require(
        bool(data.train) != bool(data.sources),
        "train",
        "give either data.train (one shard spec) or data.sources (specs with weights), not both or neither",
    )
    for i, entry in enumerate(data.sources):
        require(bool(entry.spec), f"sources[{i}].spec", "needs a shard spec")
        positive(f"sources[{i}].weight", entry.weight)
    require(
        data.resampled or all(entry.weight == 1.0 for entry in data.sources),
        "sources",
        "weights need data.resampled: true (in order, every shard is read once per epoch)",
    )
    for key in ("val_samples", "max_consecutive_failures"):
        positive(key, getattr(data, key))
    positive("num_workers", data.num_workers, allow_zero=True)
    positive("text.max_length", data.text.max_length)
    one_of("text.train_on", data.text.train_on, TRAIN_ON)
    for key in ("batch_tokens", "max_batch_size", "lookahead", "max_wait"):
        positive(f"batching.{key}", getattr(data.batching, key))
    if data.batching.row_tokens is not None:
        positive("batching.row_tokens", data.batching.row_tokens)
    positive("decoding.max_image_pixels", data.decoding.max_image_pixels)
    for key in ("fps", "max_frames"):
        positive(f"video.{key}", getattr(data.video, key))
    require(data.video.budget in LEVELS, "video.budget", f"{data.video.budget} is not one of {', '.join(map(str, LEVELS))}")
    if data.video.levels is not None:
        levels = data.video.levels
        known = ", ".join(map(str, LEVELS))
        require(bool(levels) and set(levels) <= set(LEVELS), "video.levels", f"{levels} must be some of {known}")
        weights = data.video.weights
        require(
            weights is None or (len(weights) == len(levels) and all(weight >= 0 for weight in weights) and sum(weights) > 0),
            "video.weights",
            f"{weights} must give one weight >= 0 per level of data.video.levels, not all 0",
        )
    else:
        require(data.video.weights is None, "video.weights", "weights need data.video.levels")
    if data.video.max_tokens is not None:
        largest = max(data.video.levels or [data.video.budget])
        require(
            data.video.max_tokens >= largest,
            "video.max_tokens",
            f"{data.video.max_tokens} is less than one frame at the largest video budget, {largest}",
        )
