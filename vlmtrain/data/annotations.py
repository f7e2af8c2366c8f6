"""Reading annotation files for ``vlmtrain shards``: every record checked before any image is read.

Files: JSON Lines (one record per line), a JSON array of records (LLaVA's usual layout), or CSV (a header
row; an ``images`` column of ``;``-separated paths, empty for none; every other column a text field).
Record formats, told apart by their keys or forced with ``fmt``:

- ``records``: prompt/target records, ``{"images": ["a.jpg"], "text": "...", ...}``, stored as they are;
- ``llava``: ``{"image": "a.jpg" | [...], "conversations": [{"from": "human" | "gpt" | "system", "value":
  "<image>\\n..."}]}``;
- ``messages``: ``{"messages": [{"role": ..., "content": "..." | [{"type": "text" | "image"}]}], "images":
  [...]}`` (TRL, LLaMA-Factory).

Conversations are stored in one form (:mod:`vlmtrain.text.conversation`) whatever their input format.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtrain.errors import UserError
from vlmtrain.text.conversation import (
    UNTRAINED_KEYS,
    UNTRAINED_MEDIA,
    ConversationError,
    from_llava,
    from_messages,
    record_budgets,
)

FORMATS = ("auto", "records", "llava", "messages")
# what a conversation record's keys become: its turns, images, budgets, system prompt, and its key (or id)
CONVERSATION_KEYS = ("messages", "images", "budgets", "key", "id", "source_key")


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot become a sample: where it is (``file:line`` or ``file[index]``) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


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


def read_annotations(path: Path, fmt: str = "auto") -> Annotations:
    """Every record of ``path`` checked (see the module docstring); a file that cannot be read at all
    raises :class:`UserError`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise UserError(f"annotations {str(path)!r} not found")
    result = Annotations()
    keys: dict[str, str] = {}
    for index, (where, value) in enumerate(_raw_records(path)):
        if isinstance(value, BadRecord):
            result.bad.append(value)
            continue
        try:
            kind, record = normalise(value, fmt)
        except ConversationError as error:
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
    return result


def sample_key(record: dict[str, Any], index: int) -> str:
    """A tar-safe key: the record's ``key`` or ``id`` (dots and slashes replaced) or the running index."""
    key = str(record.get("key", record.get("id", f"{index:09d}")))
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


CONVERSATION_READERS = {  # format → (its reader, the keys the reader consumes)
    "llava": (from_llava, ("conversations", "image", "images", "budgets", "system")),
    "messages": (from_messages, ("messages", "images", "budgets", "system")),
}


def normalise(value: Any, fmt: str) -> tuple[str, dict[str, Any]]:
    """(format, record for the shard writer) of one raw record; :class:`ConversationError` says what is wrong."""
    if not isinstance(value, dict):
        raise ConversationError("a record must be a JSON object")
    for name in UNTRAINED_KEYS:
        if value.get(name):
            raise ConversationError(f"{name!r}: {UNTRAINED_MEDIA}")
    kind = fmt if fmt != "auto" else "llava" if "conversations" in value else "messages" if "messages" in value else "records"
    if kind in CONVERSATION_READERS:
        read, consumed = CONVERSATION_READERS[kind]
        messages, images, budgets = read(value)
        rest = {name: entry for name, entry in value.items() if name not in consumed}
        return kind, {**rest, "images": images, "messages": messages, "budgets": budgets}
    if "conversations" in value or "messages" in value:
        raise ConversationError(f"a conversation, but --format {fmt} was asked for")
    if "image" in value and "images" not in value:
        raise ConversationError("'image' is not a field of prompt/target records; use 'images', a list of paths")
    images = value.get("images", [])
    if not isinstance(images, list) or not all(isinstance(name, str) and name for name in images):
        raise ConversationError("'images' must be a list of paths")
    return kind, {**value, "images": images, "budgets": record_budgets(value, len(images))}


def _raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed value, or a BadRecord for what cannot be parsed) of every record of the file."""
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path)
        return
    text = path.read_text()
    if path.suffix.lower() == ".json" and not _looks_like_json_lines(text):
        try:
            values = json.loads(text)
        except ValueError as error:
            raise UserError(f"{path}: not valid JSON: {error}") from None
        if not isinstance(values, list):
            raise UserError(f"{path}: a .json file must hold a list of records (or be JSON Lines: one record per line)")
        for index, value in enumerate(values):
            yield f"{path}[{index}]", value
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except ValueError as error:
                yield f"{path}:{number}", BadRecord(f"{path}:{number}", f"not valid JSON: {error}")


def _looks_like_json_lines(text: str) -> bool:
    """Several lines that each hold a whole object: JSON Lines saved as .json."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("{"):
        return False
    try:
        json.loads(lines[0])
    except ValueError:
        return False
    return True


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "images" not in columns:
            close = difflib.get_close_matches("images", columns, n=1, cutoff=0.6)
            hint = f"; did you mean to name {close[0]!r} 'images'?" if close else ""
            raise UserError(f"{path}: no 'images' column (columns: {', '.join(columns) or 'none'}){hint}")
        for number, row in enumerate(reader, start=2):
            if None in row:
                yield f"{path}:{number}", BadRecord(f"{path}:{number}", "more values than columns")
                continue
            images = [name.strip() for name in (row.pop("images") or "").split(";") if name.strip()]
            yield f"{path}:{number}", {**row, "images": images}
