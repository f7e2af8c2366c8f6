"""Writing WebDataset shards from images plus annotation records.

Each sample becomes ``KEY.json`` (the record's text fields and every image's name, width and height)
and ``KEY.<i>.<ext>`` per image, bytes unchanged. Output is deterministic for the same input (whatever
the number of worker processes); images that cannot be decoded are reported and their samples left
out; every shard is written to a temporary name and renamed when complete; ``<prefix>-index.json`` maps
shard → sample count and lists the rejected samples.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm
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
    """Records of a JSONL file (one JSON object per line) or a CSV file (a header row; an ``images``
    column of ``;``-separated paths, empty for none; every other column a text field)."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                if None in row:
                    raise UserError(f"{path}:{number}: more values than columns")
                images = [name for name in (row.pop("images", "") or "").split(";") if name.strip()]
                yield {**row, "images": [name.strip() for name in images]}
        return
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


def _encode_indexed(job: tuple[int, dict[str, Any]], image_root: Path) -> tuple[str, dict[str, bytes] | SampleError]:
    index, record = job
    key = sample_key(record, index)
    try:
        return key, encode_sample(record, key, image_root)
    except SampleError as error:
        return key, error


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
) -> ShardReport:
    """Write ``records`` to ``out_dir/<prefix>-000000.tar``... and ``out_dir/<prefix>-index.json``.

    A shard closes at ``samples_per_shard`` samples or before it would pass ``max_shard_bytes``. Images
    are read and checked by ``workers`` processes; the output does not depend on their number.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ShardReport()
    writer: TarWriter | None = None
    shard_path = temp_path = None
    shard_bytes = 0

    def close() -> None:
        if writer is not None:
            writer.close()
            os.replace(temp_path, shard_path)

    encode = partial(_encode_indexed, image_root=image_root)
    with multiprocessing.Pool(workers) if workers > 1 else nullcontext() as pool:
        results = pool.imap(encode, enumerate(records), chunksize=4) if pool else map(encode, enumerate(records))
        for key, files in tqdm(results, desc=f"writing {prefix} shards", unit=" samples", disable=not progress):
            if isinstance(files, SampleError):
                report.rejected.append((key, str(files)))
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
            shard_bytes += size
    close()
    index_file = out_dir / f"{prefix}-index.json"
    index_file.write_text(json.dumps({"shards": report.shards, "samples": report.samples, "rejected": report.rejected}, indent=1))
    return report


def parse_bytes(text: str) -> int:
    """``"512MB"``, ``"1.5GB"``, ``"4096"`` → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise UserError(f"size {text!r} must look like 512MB, 1.5GB or 4096")
    return int(float(match.group(1)) * units[match.group(2).upper()])
