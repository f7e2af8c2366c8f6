"""One sample as stored in a shard: a JSON record plus its image files, still encoded.

Shard layout (written by :mod:`vlmtrain.data.shards`): ``KEY.json`` holds the text fields and
``"images": [{"name": "0.jpg", "width": W, "height": H}, ...]`` (an image may fix its ``budget``), and a
conversation record its ``messages`` (:mod:`vlmtrain.text.conversation`) and ``videos`` (each with its facts:
:func:`vlmtrain.data.video.probe_video`); ``KEY.0.jpg`` holds the bytes, ``KEY.v0.mp4`` a video's.
The sizes in the JSON let the pipeline compute geometry and batch sizes before decoding anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vlmtrain.text.conversation import ConversationError, check_budgets, check_conversation, video_budgets


class SampleError(ValueError):
    """A sample that cannot be used; ``kind`` says why (counted per kind by the pipeline)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class RawSample:
    """A sample before decoding: its JSON record, image bytes in order (a video's sampled frames among them once
    :func:`vlmtrain.data.video.with_frames` has placed them), (height, width) of each image, the budget a record
    fixes for each (None: drawn), which video each is a frame of (None: an image; empty: no frames), the M-RoPE
    time of each in its video's block (empty: each opens its own; :meth:`FrameLayout.token_time`), its videos still whole
    (a file's bytes, or a list of its frames' bytes, and the facts)."""

    key: str
    record: dict[str, Any]
    images: list[Any] = field(default_factory=list)  # encoded image bytes, or VideoFrame
    sizes: list[tuple[int, int]] = field(default_factory=list)
    source: str = ""
    budgets: list[int | None] = field(default_factory=list)
    videos: list[tuple[bytes | list[bytes], dict[str, Any]]] = field(default_factory=list)
    frame_of: list[int | None] = field(default_factory=list)
    token_times: list[int] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, Any]] | None:
        """The conversation, for a conversation record (:mod:`vlmtrain.text.conversation`)."""
        return self.record.get("messages")

    def text(self, name: str) -> str:
        """The text field ``name``; :class:`SampleError` (kind ``missing_text``) when absent or not a string."""
        value = self.record.get(name)
        if not isinstance(value, str):
            raise SampleError("missing_text", f"sample {self.key!r} has no text field {name!r}")
        return value


def video_files(key: str, entry: Any, files: dict[str, bytes]) -> tuple[bytes | list[bytes], dict[str, Any]]:
    """A stored video's bytes (a file, or its frames' images in order) and its entry; :class:`SampleError` when
    the entry lacks its facts or a file is missing."""
    frames = entry.get("images") if isinstance(entry, dict) else None
    try:
        if frames is not None:
            names = [str(frame["name"]).lower() for frame in frames if int(frame["width"]) > 0 and int(frame["height"]) > 0]
            if not names or len(names) != len(frames):
                raise ValueError
        else:
            names = [str(entry["name"]).lower()]
            if not all(float(entry[name]) > 0 for name in ("width", "height", "duration", "fps", "frames")):
                raise ValueError
    except (KeyError, TypeError, ValueError, AttributeError):
        needs = "name, width, height, duration, fps, frames (> 0)" if frames is None else "images (each with name, width, height)"
        raise SampleError("bad_json", f"sample {key!r}: video entry {entry!r:.200} needs {needs}") from None
    for name in names:
        if name not in files:
            raise SampleError("missing_video", f"sample {key!r}: video file {name!r} is missing")
    return ([files[name] for name in names] if frames is not None else files[names[0]]), entry


def parse_sample(files: dict[str, Any]) -> RawSample:
    """Build a :class:`RawSample` from a webdataset file group (``{"__key__": ..., "json": b"...", "0.jpg": b"..."}``)."""
    key = str(files.get("__key__", "?"))
    source = str(files.get("__url__", ""))
    if "json" not in files:
        raise SampleError("missing_json", f"sample {key!r} has no .json record")
    try:
        record = json.loads(files["json"])
    except (ValueError, UnicodeDecodeError) as error:
        raise SampleError("bad_json", f"sample {key!r}: malformed JSON: {error}") from None
    if not isinstance(record, dict):
        raise SampleError("bad_json", f"sample {key!r}: JSON record is not an object")
    entries = record.get("images", [])
    if not isinstance(entries, list):
        raise SampleError("bad_json", f"sample {key!r}: 'images' must be a list")
    images, sizes, budgets = [], [], []
    for entry in entries:
        try:
            name, width, height = str(entry["name"]).lower(), int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError):
            raise SampleError("bad_json", f"sample {key!r}: image entry {entry!r} needs name, width, height") from None
        if width < 1 or height < 1:
            raise SampleError("bad_json", f"sample {key!r}: image {name!r} has size {width}x{height}")
        if name not in files:
            raise SampleError("missing_image", f"sample {key!r}: image file {name!r} is missing")
        images.append(files[name])
        sizes.append((height, width))
        budgets.append(entry.get("budget"))
    videos = [video_files(key, entry, files) for entry in record.get("videos", [])]
    try:
        check_budgets(budgets)
        for index, (_, video) in enumerate(videos):
            video_budgets({name: video.get(name) for name in ("budget", "key_frames")}, f"video {index + 1}")
        if "messages" in record:
            check_conversation(record["messages"], len(images), videos=len(videos))
        elif videos:
            raise ConversationError("videos train in conversations only")
    except ConversationError as error:
        raise SampleError("bad_conversation", f"sample {key!r}: {error}") from None
    return RawSample(key=key, record=record, images=images, sizes=sizes, source=source, budgets=budgets, videos=videos)
