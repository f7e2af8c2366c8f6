"""Video: the facts of a video file (:func:`probe_video`, what ``vlmtrain shards`` stores beside its bytes), which
frames a sample trains on (:meth:`FrameLayout.frame_indices`, a pure function of those facts, the recipe's
``data.video`` and the family's layout: the frames its own video processor samples, at their times),
and decoding only those frames at the size their budget needs (:func:`decode_frames`), with PyAV (FFmpeg).

A video trains as its sampled frames, written as the model's family writes them (:class:`FrameLayout`): each frame
(or each unit of frames that share their tokens, Qwen3-VL's two) an image of the sample at the video's budget,
after its time (``mm:ss`` as Gemma 4's processor writes it, ``<1.5 seconds>`` as Qwen3-VL's), its tokens the
family's video token where it has one.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any

from PIL import Image

from vlmtrain.budget import BudgetSchedule
from vlmtrain.data.config import VideoConfig
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.modeling.prompt import FRAMES_AS_IMAGES, IMAGE, OPENS, FrameLayout, unit_kind, with_key_frames


@dataclass(frozen=True)
class VideoFrame:
    """One sampled frame of a stored video: the video's bytes and the frame's time in seconds."""

    video: bytes
    time: float


def probe_video(data: bytes) -> dict[str, Any]:
    """The facts of a video file (container, codec, width, height, duration in seconds, frames per second, frame
    count, whether it has audio) from its headers; :class:`SampleError` of kind ``video`` when it has no video
    stream, cannot be read, or lasts no time."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise SampleError("video", "the file holds no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / 1e6
            frames = stream.frames or (round(duration * rate) if rate else 0)
            facts = {
                "container": container.format.name.split(",")[0], "codec": stream.codec_context.name,
                "width": stream.codec_context.width, "height": stream.codec_context.height,
                "duration": round(duration, 6), "fps": round(rate, 6), "frames": int(frames),
                "audio": bool(container.streams.audio),
            }
    except SampleError:
        raise
    except Exception as error:  # FFmpeg raises many types for broken files
        raise SampleError("video", f"cannot read the video: {type(error).__name__}: {error}") from None
    if not facts["duration"] > 0 or not facts["frames"] or facts["width"] < 1 or facts["height"] < 1:
        raise SampleError("video", f"the video lasts no time or has no frames ({facts['frames']} frames, {facts['duration']} s)")
    return facts


SEEK_AHEAD = 2.0  # seconds: a frame farther ahead than this is reached by a seek, a nearer one by decoding on


def decode_frames(data: bytes, times: list[float], sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """The frames at ``times`` (ascending, seconds from the video's first frame) of a video, each scaled to its
    (height, width) in ``sizes`` as it is converted to RGB; a frame more than :data:`SEEK_AHEAD` seconds ahead is
    sought (decoding from the key frame before it), so that a long video's skipped stretches are never decoded.
    :class:`SampleError` of kind ``video`` for a broken video."""
    import av

    frames: list[Image.Image] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            half_frame = 0.5 / float(stream.average_rate or 1)
            start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
            decoded: Iterator[av.VideoFrame] | None = None
            current = None
            for time, (height, width) in zip(times, sizes, strict=True):
                time += start
                if decoded is None or current is None or current.time + SEEK_AHEAD < time:
                    container.seek(max(0, int(time / stream.time_base)), stream=stream, backward=True)
                    decoded, current = container.decode(stream), None
                while current is None or current.time + half_frame < time:
                    current = next(decoded, None)
                    if current is None:
                        raise SampleError("video", f"the video ends before {time - start:.2f} s")
                frames.append(current.to_image(width=width, height=height))
    except SampleError:
        raise
    except Exception as error:  # FFmpeg raises many types for broken files
        raise SampleError("video", f"cannot decode the video: {type(error).__name__}: {error}") from None
    return frames


def sampled_frames(
    data: bytes | list[bytes], facts: dict[str, Any], config: VideoConfig, max_frames: int, layout: FrameLayout = FRAMES_AS_IMAGES
) -> tuple[list[tuple[float, Any, tuple[int, int], int | None]], float]:
    """(time, what decodes it, (height, width), the budget its record fixes for it) of each frame a video trains
    on: those its family samples (``layout.frame_indices``) and its key frames (:func:`with_key_frames`); what
    decodes it is a :class:`VideoFrame` of a video file, or the image of a video given as frames; and how many
    frames that is per second of the video. Frames given as images are taken to be ``config.fps`` apart (as
    LLaMA-Factory takes them ``video_fps`` apart), so all of them train unless there are more than ``max_frames``
    (or, Qwen2.5-VL's, an odd one out)."""
    given_as_images = isinstance(data, list)
    total, rate = (len(data), config.fps) if given_as_images else (int(facts["frames"]), float(facts["fps"]))
    picked = with_key_frames(layout.frame_indices(total, rate, config.fps, max_frames), facts.get("key_frames", []), rate, total)
    sampled_fps = len(picked) / total * rate
    if given_as_images:
        sizes = [(int(frame["height"]), int(frame["width"])) for frame in facts["images"]]
        return [(index / rate, data[index], sizes[index], budget) for index, budget in picked], sampled_fps
    size = (int(facts["height"]), int(facts["width"]))
    return [(index / rate, VideoFrame(data, index / rate), size, budget) for index, budget in picked], sampled_fps


def with_frames(sample: RawSample, config: VideoConfig, layout: FrameLayout = FRAMES_AS_IMAGES) -> RawSample:
    """``sample`` with each video part of its conversation replaced by the video's sampled frames
    (:meth:`FrameLayout.frame_indices` at ``config``) as the model's family writes them (``layout``): per unit of
    ``layout.frames`` consecutive frames (the last one filled with its last frame), its time (the mean of its
    frames') and an image part, the units among the sample's images in conversation order (a unit of several
    frames as a tuple of them), each at the video's budget (the one its record fixes, else ``config.budget``, or
    none when ``config.levels`` draws it: :func:`frame_budgets`), a unit that holds a key frame at its budget."""
    if not sample.videos:
        return sample
    count = len(sample.images)
    images = iter(zip(sample.images, sample.sizes, sample.budgets, [None] * count, [OPENS] * count, strict=True))
    videos = iter(enumerate(sample.videos))
    placed: list[tuple[Any, tuple[int, int], int | None, int | None, int]] = []
    messages = []
    for message in sample.messages or []:
        content = []
        for part in message["content"]:
            if part["type"] == "image":
                placed.append(next(images))
                content.append(part)
            elif part["type"] == "video":
                video, (data, facts) = next(videos)
                budget = facts.get("budget") or (None if config.levels else config.budget)
                most = config.frames(budget or config.budget, layout.frames)
                frames, sampled_fps = sampled_frames(data, facts, config, most, layout)
                for start, stop, stamp, time in layout.units([time for time, *_ in frames], sampled_fps):
                    unit = frames[start:stop]
                    content += [{"type": "text", "text": stamp}, {"type": "image"}] if stamp else [{"type": "image"}]
                    items = tuple(frame for _, frame, _, _ in unit)
                    fixed = [key for *_, key in unit if key is not None]  # a key frame's budget is its unit's
                    placed.append((items if layout.frames > 1 else items[0], unit[0][2], max(fixed, default=budget), video, time))
            else:
                content.append(part)
        messages.append({**message, "content": content})
    columns = [list(column) for column in zip(*placed, strict=True)] if placed else [[] for _ in range(5)]
    frames, sizes, budgets, frame_of, times = columns
    record = {**sample.record, "messages": messages}
    return replace(
        sample, record=record, images=frames, sizes=sizes, budgets=budgets, videos=[], frame_of=frame_of, token_times=times
    )


def placeholder_kinds(sample: RawSample) -> list[int]:
    """What each of the sample's images is in the text: an image, a video's unit, or a unit in the block its
    video's previous unit opened (it has a time in it: :func:`with_frames`); :data:`~vlmtrain.modeling.prompt.IMAGE`
    and so on."""
    times = sample.token_times or [OPENS] * len(sample.frame_of)
    return [IMAGE if video is None else unit_kind(time) for video, time in zip(sample.frame_of, times, strict=True)]


def frame_budgets(sample: RawSample, config: VideoConfig, schedule: BudgetSchedule, step: int) -> list[int | None]:
    """The budget the sample fixes for each image, every frame whose budget is drawn (``config.levels``) at its
    video's draw for ``step`` (:meth:`~vlmtrain.budget.BudgetSchedule.video_budget`)."""
    if not config.levels:
        return sample.budgets
    weights = config.weights or [1.0] * len(config.levels)
    return [
        schedule.video_budget(step, sample.key, video, config.levels, weights) if budget is None and video is not None else budget
        for budget, video in zip(sample.budgets, sample.frame_of or [None] * len(sample.budgets), strict=True)
    ]


def decoded_images(
    images: list[Any], sizes: list[tuple[int, int]], decode_image: Callable[[Any, int], Image.Image]
) -> list[Image.Image | tuple[Image.Image, ...]]:
    """Each of a sample's images decoded (a unit of several frames: a tuple of them): a run of frames of one video
    by one :func:`decode_frames` (each at its image's (height, width) in ``sizes``, the size its budget gives it),
    any other by ``decode_image(data, index)``."""
    flat = [(index, item) for index, image in enumerate(images) for item in (image if isinstance(image, tuple) else (image,))]
    decoded: list[list[Image.Image]] = [[] for _ in images]

    def video_of(entry: tuple[int, tuple[int, Any]]) -> int:  # frames of one video share it; any other image is its own
        position, (_, item) = entry
        return id(item.video) if isinstance(item, VideoFrame) else -1 - position

    for _, entries in groupby(enumerate(flat), key=video_of):
        run = [entry for _, entry in entries]
        index, item = run[0]
        if isinstance(item, VideoFrame):
            frames = decode_frames(item.video, [frame.time for _, frame in run], [sizes[index] for index, _ in run])
            for (index, _), frame in zip(run, frames, strict=True):
                decoded[index].append(frame)
        else:
            decoded[index].append(decode_image(item, index))
    return [tuple(frames) if isinstance(image, tuple) else frames[0] for image, frames in zip(images, decoded, strict=True)]
