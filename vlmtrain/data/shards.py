"""Writing WebDataset shards from images plus annotation records.

Each sample becomes ``KEY.json`` (the record's text fields and every image's name, width and height)
and ``KEY.<i>.<ext>`` per image, bytes unchanged. Output is deterministic for the same input; images
that cannot be decoded are reported and their samples left out; every shard is written to a temporary
name and renamed when complete; ``<prefix>-index.json`` maps shard → sample count.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset import TarWriter

from vlmtrain.data.images import decode_image
from vlmtrain.data.samples import SampleError
from vlmtrain.errors import UserError

EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "gif": "gif", "tif": "tif", "tiff": "tif", "webp": "webp", "bmp": "bmp"}
MAX_IMAGE_PIXELS = 178_956_970


@dataclass
class ShardReport:
    """What a shard-writing run produced: samples per shard, and the samples it rejected with the reason."""

    shards: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(self.shards.values())


def read_annotations(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, one JSON object per line (blank lines ignored)."""
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise UserError(f"{path}:{number}: not valid JSON: {error}") from None
                if not isinstance(record, dict) or not isinstance(record.get("images", []), list):
                    raise UserError(f"{path}:{number}: a record must be an object whose 'images' is a list of paths")
                yield record


def stored_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes as the training pipeline will see them (EXIF applied)."""
    image = decode_image(data, MAX_IMAGE_PIXELS)
    return image.height, image.width


def image_extension(path: Path, data: bytes) -> str:
    """Extension naming the image's real format (webdataset keys on it), not the file name's."""
    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or path.suffix.lstrip(".")).lower()
    return EXTENSIONS.get(fmt, fmt)


def sample_key(record: dict[str, Any], index: int) -> str:
    """A tar-safe key: the record's ``key`` (dots and slashes replaced) or the running index."""
    key = str(record.get("key", f"{index:09d}"))
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def encode_sample(record: dict[str, Any], key: str, image_root: Path) -> dict[str, bytes]:
    """The files of one sample; raises :class:`SampleError` if an image is missing or undecodable."""
    files: dict[str, bytes] = {}
    entries = []
    for position, name in enumerate(record.get("images", [])):
        path = image_root / name
        if not path.is_file():
            raise SampleError("missing_image", f"{key}: image {str(path)!r} not found")
        data = path.read_bytes()
        height, width = stored_size(data)
        stored_name = f"{position}.{image_extension(path, data)}"
        files[stored_name] = data
        entries.append({"name": stored_name, "width": width, "height": height})
    fields = {name: value for name, value in record.items() if name not in ("key", "images")}
    files["json"] = json.dumps({**fields, "images": entries}, sort_keys=True, ensure_ascii=False).encode()
    return files


def write_shards(records: Iterable[dict[str, Any]], image_root: Path, out_dir: Path, prefix: str, samples_per_shard: int) -> ShardReport:
    """Write ``records`` to ``out_dir/<prefix>-000000.tar``... and ``out_dir/<prefix>-index.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ShardReport()
    writer: TarWriter | None = None
    shard_path = temp_path = None

    def close() -> None:
        if writer is not None:
            writer.close()
            os.replace(temp_path, shard_path)

    for index, record in enumerate(records):
        key = sample_key(record, index)
        try:
            files = encode_sample(record, key, image_root)
        except SampleError as error:
            report.rejected.append((key, str(error)))
            continue
        if writer is None or report.shards[shard_path.name] >= samples_per_shard:
            close()
            shard_path = out_dir / f"{prefix}-{len(report.shards):06d}.tar"
            temp_path = shard_path.with_suffix(".tar.tmp")
            writer = TarWriter(str(temp_path), encoder=False, mtime=0.0)
            report.shards[shard_path.name] = 0
        writer.write({"__key__": key, **files})
        report.shards[shard_path.name] += 1
    close()
    index_file = out_dir / f"{prefix}-index.json"
    index_file.write_text(json.dumps({"shards": report.shards, "samples": report.samples, "rejected": report.rejected}, indent=1))
    return report
