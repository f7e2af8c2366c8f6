"""Writing WebDataset shards from images plus annotation records.

Each sample becomes ``KEY.json`` (the record's text fields or its conversation, and every image's name,
width, height and fixed budget if any, every video's name and facts) and ``KEY.<i>.<ext>`` per image,
``KEY.v<i>.<ext>`` per video, ``KEY.v<i>.<j>.<ext>`` per frame of a video given as images, bytes unchanged. Images are read
from inside the images folder only, unless allowed otherwise. Output is deterministic for the same input (whatever
the number of worker processes); images that cannot be decoded are reported and their samples left
out; every shard is written to a temporary name and renamed when complete; ``<prefix>-index.json`` maps
shard → sample count and lists the rejected samples.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset import TarWriter

from vlmtrain import reporting
from vlmtrain.data.annotations import sample_key
from vlmtrain.data.images import decode_image
from vlmtrain.data.samples import SampleError
from vlmtrain.data.video import probe_video
from vlmtrain.errors import UserError
from vlmtrain.text.conversation import ImageRef, VideoRef

EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "gif": "gif", "tif": "tif", "tiff": "tif", "webp": "webp", "bmp": "bmp"}
MAX_IMAGE_PIXELS = 178_956_970
VIDEO_EXTENSIONS = {"mov": "mp4", "matroska": "mkv", "avi": "avi", "webm": "webm", "mpeg": "mpg", "ogg": "ogv", "gif": "gif"}


@dataclass
class ShardReport:
    """What a shard-writing run produced: samples per shard, the samples it rejected with the reason, and how
    many of the videos it stored have an audio track (which training ignores)."""

    shards: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    videos_with_audio: int = 0

    @property
    def samples(self) -> int:
        return sum(self.shards.values())


def stored_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes as the training pipeline will see them (EXIF applied)."""
    image = decode_image(data, MAX_IMAGE_PIXELS)
    return image.height, image.width


def image_extension(path: Path, data: bytes) -> str:
    """Extension naming the image's real format (webdataset keys on it), not the file name's."""
    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or path.suffix.lstrip(".")).lower()
    return EXTENSIONS.get(fmt, fmt)


def image_path(name: str, image_root: Path, outside_images: bool = False, what: str = "image") -> Path:
    """The file of an image (or ``what``: video) path of a record; raises :class:`SampleError` if it is missing or
    (unless ``outside_images``) outside ``image_root`` (``..``, an absolute path, a symlink out)."""
    path = image_root / name
    if not outside_images and not path.resolve().is_relative_to(image_root.resolve()):
        raise SampleError("outside_images", f"{what} {name!r} is outside {str(image_root)!r} (--allow-outside-images reads it)")
    if not path.is_file():
        raise SampleError(f"missing_{what}", f"{what} {str(path)!r} not found")
    return path


def check_image_paths(record: dict[str, Any], image_root: Path, outside_images: bool = False) -> None:
    """Every image and video the record names by path is a file it may read (see :func:`image_path`), before any
    is read."""
    for ref in record.get("images", []):
        if isinstance(ref, str):
            image_path(ref, image_root, outside_images)
    for ref in record.get("videos", []):
        for name in ref if isinstance(ref, list) else []:
            image_path(name, image_root, outside_images, "video frame")
        if isinstance(ref, str):
            image_path(ref, image_root, outside_images, "video")


def image_data(ref: ImageRef, image_root: Path, outside_images: bool = False) -> tuple[Path, bytes]:
    """(name, bytes) of one image of a record: a file under ``image_root`` or the bytes the record carries."""
    if isinstance(ref, dict):
        return Path(ref["path"] or "image"), ref["bytes"]
    path = image_path(ref, image_root, outside_images)
    return path, path.read_bytes()


def encode_sample(record: dict[str, Any], image_root: Path, outside_images: bool = False) -> tuple[dict[str, bytes], int]:
    """The files of one sample, and how many of its videos have an audio track; raises :class:`SampleError` if an
    image or video is unusable (:func:`image_path`, undecodable)."""
    files: dict[str, bytes] = {}
    entries = []
    budgets = record.get("budgets") or [None] * len(record.get("images", []))
    for position, (ref, budget) in enumerate(zip(record.get("images", []), budgets, strict=True)):
        path, data = image_data(ref, image_root, outside_images)
        height, width = stored_size(data)
        stored_name = f"{position}.{image_extension(path, data)}"
        files[stored_name] = data
        entries.append(
            {"name": stored_name, "width": width, "height": height, **({"budget": budget} if budget is not None else {})}
        )
    refs = record.get("videos", [])
    fixed = record.get("video_budgets") or [{}] * len(refs)
    videos = [
        key_frames_within(encode_video(ref, f"v{index}", files, image_root, outside_images) | budgets, index)
        for index, (ref, budgets) in enumerate(zip(refs, fixed, strict=True))
    ]
    unstored = ("key", "images", "budgets", "videos", "video_budgets")
    fields = {name: value for name, value in record.items() if name not in unstored}
    stored = {**fields, "images": entries, **({"videos": videos} if videos else {})}
    files["json"] = json.dumps(stored, sort_keys=True, ensure_ascii=False).encode()
    return files, sum(video.get("audio", False) for video in videos)


def key_frames_within(entry: dict[str, Any], index: int) -> dict[str, Any]:
    """A stored video's entry, once each key frame its record fixes is checked to lie within the video file
    (:class:`SampleError` names the first that does not; a video given as frames lasts as long as the recipe's
    rate makes it, and a key frame past its last frame is its last frame)."""
    for key in entry.get("key_frames", []) if "duration" in entry else []:
        if key["time"] >= entry["duration"]:
            end = f"past its end ({entry['duration']:.2f} s)"
            raise SampleError("video", f"video {index + 1}: a key frame at {key['time']} s, {end}")
    return entry


def encode_video(ref: VideoRef, stem: str, files: dict[str, bytes], image_root: Path, outside_images: bool) -> dict[str, Any]:
    """Add one video's files to ``files`` under ``stem`` and return its entry: a video file's bytes with its facts
    (:func:`probe_video`), or each frame of a video given as images with its size; :class:`SampleError` names
    the unusable file."""
    if isinstance(ref, list):
        frames = []
        for index, name in enumerate(ref):
            path = image_path(name, image_root, outside_images, "video frame")
            data = path.read_bytes()
            try:
                height, width = stored_size(data)
            except SampleError as error:
                raise SampleError(error.kind, f"video frame {name!r}: {error}") from None
            frames.append({"name": f"{stem}.{index}.{image_extension(path, data)}", "width": width, "height": height})
            files[frames[-1]["name"]] = data
        return {"images": frames, "frames": len(frames)}
    path = image_path(ref, image_root, outside_images, "video")
    data = path.read_bytes()
    try:
        facts = probe_video(data)
    except SampleError as error:
        hint = " (an image: a video given as frames is a list of image paths, one list per video)" if _is_image(data) else ""
        raise SampleError(error.kind, f"video {ref!r}: {error}{hint}") from None
    name = f"{stem}.{VIDEO_EXTENSIONS.get(facts['container'], path.suffix.lstrip('.').lower() or 'video')}"
    files[name] = data
    return {"name": name, **facts}


def _is_image(data: bytes) -> bool:
    """Whether ``data`` opens as an image (a frame given where a video file was expected)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:
        return False


def _encode_indexed(
    job: tuple[int, dict[str, Any]], image_root: Path, outside_images: bool
) -> tuple[str, dict[str, bytes] | SampleError, int]:
    index, record = job
    key = sample_key(record, index)
    try:
        return key, *encode_sample(record, image_root, outside_images)
    except SampleError as error:
        return key, error, 0


def _tar_bytes(files: dict[str, bytes]) -> int:
    """Bytes the files take in a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for data in files.values())


def write_shards(
    records: Iterable[dict[str, Any]],
    image_root: Path,
    out_dir: Path,
    prefix: str,
    samples_per_shard: int,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    progress: bool = False,
    outside_images: bool = False,
    left_out: Sequence[str] = (),
    skip_bad: bool = True,
) -> ShardReport:
    """Write ``records`` to ``out_dir/<prefix>-000000.tar``... and ``out_dir/<prefix>-index.json`` (which also
    lists ``left_out``: records refused before writing).

    A shard closes at ``samples_per_shard`` samples or before it would pass ``max_shard_bytes``. Images
    are read and checked by ``workers`` processes; the output does not depend on their number. A sample
    whose image is unusable is left out and reported, or (``skip_bad=False``) stops the writing with
    :class:`UserError` and removes the shards written. On any error the shard being written is removed: no
    temporary file stays behind.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; shards go into a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ShardReport()
    writer: TarWriter | None = None
    shard_path = temp_path = None
    shard_bytes = 0

    def close() -> None:
        if writer is not None:
            writer.close()
            os.replace(temp_path, shard_path)

    records = list(records)
    total = len(records)
    encode = partial(_encode_indexed, image_root=image_root, outside_images=outside_images)
    try:
        with multiprocessing.Pool(workers) if workers > 1 else nullcontext() as pool:
            results = pool.imap(encode, enumerate(records), chunksize=4) if pool else map(encode, enumerate(records))
            for key, files, with_audio in reporting.progress(results, f"writing {prefix} shards", total) if progress else results:
                if isinstance(files, SampleError):
                    report.rejected.append((key, str(files)))
                    if not skip_bad:
                        raise UserError(f"sample {key}: {files}; nothing written (--skip-bad writes the others)")
                    continue
                size = _tar_bytes(files)
                full = writer is not None and (
                    report.shards[shard_path.name] >= samples_per_shard
                    or (max_shard_bytes is not None and shard_bytes + size > max_shard_bytes)
                )
                if writer is None or full:
                    close()
                    shard_path = out_dir / f"{prefix}-{len(report.shards):06d}.tar"
                    temp_path = shard_path.with_suffix(".tar.tmp")
                    writer = TarWriter(str(temp_path), encoder=False, mtime=0.0)
                    report.shards[shard_path.name] = 0
                    shard_bytes = 0
                writer.write({"__key__": key, **files})
                report.shards[shard_path.name] += 1
                report.videos_with_audio += with_audio
                shard_bytes += size
        close()
    except UserError:
        for name in report.shards:
            (out_dir / name).unlink(missing_ok=True)
        raise
    finally:
        if temp_path is not None and temp_path.exists():
            temp_path.unlink()
    index_file = out_dir / f"{prefix}-index.json"
    index = {"shards": report.shards, "samples": report.samples, "rejected": report.rejected, "left_out": list(left_out)}
    index_file.write_text(json.dumps(index, indent=1))
    return report


def parse_bytes(text: str) -> int:
    """``"512MB"``, ``"1.5GB"``, ``"4096"`` → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise UserError(f"size {text!r} must look like 512MB, 1.5GB or 4096")
    return int(float(match.group(1)) * units[match.group(2).upper()])
