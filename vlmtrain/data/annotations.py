"""Reading annotation files for ``vlmtrain shards``: every record checked before any image is read.

Files (:mod:`vlmtrain.data.record_files`): JSON Lines, a JSON array (LLaVA's usual layout), CSV (an ``images``
column of ``;``-separated paths), Parquet, Arrow, a ``datasets`` folder; an image is a path (relative to the
images folder) or a Hugging Face image struct with its bytes. Keys that differ from the names below are mapped
with ``columns`` (LLaMA-Factory's ``dataset_info.json`` ``columns``: ``{"messages": "conversations"}``).
Record formats, told apart by their keys or forced with ``fmt``:

- ``records``: prompt/target records, ``{"images": ["a.jpg"], "text": "...", ...}``, stored as they are;
- ``llava``: ``{"image": "a.jpg" | [...], "conversations": [{"from": "human" | "gpt" | "system", "value":
  "<image>\\n..."}]}`` (``videos`` and ``<video>`` markers alike);
- ``messages``: ``{"messages": [{"role": ..., "content": "..." | [{"type": "text" | "image" | "video"}]}],
  "images": [...], "videos": [...]}`` (TRL, LLaMA-Factory).

Conversations are stored in one form (:mod:`vlmtrain.text.conversation`) whatever their input format.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtrain.data.record_files import BadRecord, raw_records
from vlmtrain.data.samples import SampleError
from vlmtrain.errors import UserError
from vlmtrain.text.conversation import (
    UNTRAINED_KEYS,
    UNTRAINED_MEDIA,
    ConversationError,
    from_llava,
    from_messages,
    image_refs,
    present,
    record_budgets,
)

FORMATS = ("auto", "records", "llava", "messages")
# what a conversation record's keys become: its turns, images, budgets, system prompt, and its key (or id)
CONVERSATION_KEYS = ("messages", "images", "budgets", "videos", "video_budgets", "key", "id", "source_key")
MAPPED_KEYS = ("messages", "images", "videos", "system", "id", "budgets", "video_budgets")  # what --columns may name


@dataclass
class Annotations:
    """The records of an annotation file, ready for :func:`~vlmtrain.data.shards.write_shards`, the bad
    ones with their reasons, how many records of each format were read, the keys of conversation records that
    training does not read (kept in the record, counted), and how many records were given a new key because an
    earlier record had theirs."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    unread: Counter = field(default_factory=Counter)
    renamed: int = 0


def read_annotations(
    path: Path, fmt: str = "auto", columns: dict[str, str] | None = None, check: Callable[[dict[str, Any]], None] | None = None
) -> Annotations:
    """Every record of ``path`` checked (see the module docstring; then by ``check``, which raises
    :class:`SampleError`), its keys first renamed by ``columns`` (vlmtrain's name → the file's); a file that
    cannot be read at all, or a column mapping that matches no record, raises :class:`UserError`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    columns = check_columns(columns or {})
    mapped: Counter = Counter()
    result = Annotations()
    keys: dict[str, str] = {}
    for index, (where, value) in enumerate(raw_records(path)):
        if isinstance(value, BadRecord):
            result.bad.append(value)
            continue
        try:
            value = rename_columns(value, columns, mapped)
            kind, record = normalise(value, fmt)
            if check is not None:
                check(record)
        except (ConversationError, SampleError) as error:
            result.bad.append(BadRecord(where, str(error)))
            continue
        key = sample_key(record, index)
        if key in keys:  # files mixed from several sources repeat ids: a new key, the record keeps its own
            result.renamed += 1
            number = 2
            while f"{key}_{number}" in keys:
                number += 1
            if "key" in record:
                record = {**record, "source_key": record["key"]}
            key = f"{key}_{number}"
        keys[key] = where
        result.records.append({**record, "key": key})
        result.formats[kind] += 1
        if kind != "records":
            result.unread.update(name for name in record if name not in CONVERSATION_KEYS)
    unmatched = [f"{ours}={theirs}" for ours, theirs in columns.items() if not mapped[ours]]
    if unmatched:
        raise UserError(f"--columns {','.join(unmatched)}: no record of {path} has such a key")
    return result


def parse_columns(text: str) -> dict[str, str]:
    """``"messages=conversations,images=image"`` → ``{"messages": "conversations", "images": "image"}``."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not all(part.strip() for part in pair) for pair in pairs):
        raise UserError(f"--columns {text!r} must look like messages=conversations,images=image")
    return check_columns({ours.strip(): theirs.strip() for ours, theirs in pairs})


def check_columns(columns: dict[str, str]) -> dict[str, str]:
    """A column mapping names only keys vlmtrain reads."""
    unknown = sorted(set(columns) - set(MAPPED_KEYS))
    if unknown:
        raise UserError(f"--columns: {', '.join(unknown)} is not a key vlmtrain reads (those: {', '.join(MAPPED_KEYS)})")
    return columns


def rename_columns(value: Any, columns: dict[str, str], mapped: Counter) -> Any:
    """``value`` with the file's keys under vlmtrain's names (counted in ``mapped``). A ``messages`` column of
    ShareGPT turns (``from``/``value``) becomes ``conversations``, as LLaMA-Factory's ``columns.messages`` is
    either."""
    if not columns or not isinstance(value, dict):
        return value
    renamed = dict(value)
    for ours, theirs in columns.items():
        if theirs not in renamed:
            continue
        entry = renamed.pop(theirs)
        mapped[ours] += 1
        if ours == "messages" and isinstance(entry, list) and entry and isinstance(entry[0], dict) and "from" in entry[0]:
            ours = "conversations"
        if ours in renamed:
            raise ConversationError(f"--columns maps {theirs!r} to {ours!r}, and the record has {ours!r} too")
        renamed[ours] = entry
    return renamed


def sample_key(record: dict[str, Any], index: int) -> str:
    """A tar-safe key: the record's ``key`` or ``id`` (dots and slashes replaced) or the running index."""
    key = str(present(record, "key", "id") or f"{index:09d}")
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


CONVERSATION_READERS = {  # format → (its reader, the keys the reader consumes)
    "llava": (from_llava, ("conversations", "image", "images", "video", "videos", "budgets", "video_budgets", "system")),
    "messages": (from_messages, ("messages", "images", "video", "videos", "budgets", "video_budgets", "system")),
}


def normalise(value: Any, fmt: str) -> tuple[str, dict[str, Any]]:
    """(format, record for the shard writer) of one raw record; :class:`ConversationError` says what is wrong."""
    if not isinstance(value, dict):
        raise ConversationError(f"a record must be a JSON object, found {type(value).__name__}")
    for name in UNTRAINED_KEYS:
        if value.get(name):
            raise ConversationError(f"{name!r}: {UNTRAINED_MEDIA}")
    kind = fmt if fmt != "auto" else "llava" if "conversations" in value else "messages" if "messages" in value else "records"
    if kind in CONVERSATION_READERS:
        read, consumed = CONVERSATION_READERS[kind]
        messages, images, budgets, videos, fixed = read(value)
        rest = storable({name: entry for name, entry in value.items() if name not in consumed})
        stored = {**rest, "images": images, "messages": messages, "budgets": budgets}
        if any(fixed):
            stored["video_budgets"] = fixed
        return kind, {**stored, "videos": videos} if videos else stored
    if "conversations" in value or "messages" in value:
        raise ConversationError(f"a conversation, but --format {fmt} was asked for")
    if value.get("videos") or value.get("video") or value.get("video_budgets"):
        raise ConversationError("videos train in conversations only (a 'messages' or 'conversations' record)")
    if "image" in value and "images" not in value:
        raise ConversationError("'image' is not a field of prompt/target records; use 'images', a list of paths")
    if not isinstance(value.get("images", []), list):
        raise ConversationError("'images' must be a list of paths (or of images with their bytes)")
    images = image_refs(value.get("images", []), "images")
    rest = storable({name: entry for name, entry in value.items() if name != "images"})
    return kind, {**rest, "images": images, "budgets": record_budgets(value, len(images))}


def storable(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` as a shard's JSON keeps them (a table's dates and decimals as text); binary data outside the
    image columns is refused, naming its key."""

    def as_text(value: Any) -> str:
        if isinstance(value, bytes | bytearray):
            raise TypeError
        return str(value)

    kept = {}
    for name, value in fields.items():
        try:
            kept[name] = json.loads(json.dumps(value, default=as_text, ensure_ascii=False))
        except TypeError:
            raise ConversationError(
                f"{name!r} holds binary data, which is not an image column vlmtrain reads (map it with --columns images={name})"
            ) from None
    return kept
