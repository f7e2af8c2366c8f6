"""The raw records of an annotation file, whatever its type: JSON Lines, a JSON array, CSV, Parquet, Arrow, or a
folder that ``datasets`` wrote with ``save_to_disk``. Tables are read through pyarrow (and ``datasets`` for its
folders), a row at a time as Python values: an ``Image`` column stays ``{"bytes", "path"}``, undecoded.

Each record comes with where it is (``file:line`` or ``file[row]``); a line that is not JSON comes as a
:class:`BadRecord`; a file that cannot be read at all raises :class:`~vlmtrain.errors.UserError`.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtrain.errors import UserError

FILE_TYPES = ".jsonl or .json (JSON Lines or a JSON array), .csv, .parquet, .arrow, or a folder written by datasets' save_to_disk"
TABLE_ROWS = 256  # rows converted to Python at a time


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot become a sample: where it is (``file:line`` or ``file[index]``) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed value or a BadRecord) of every record of ``path``, in order."""
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _table_rows(path, _saved_dataset_batches(path))
    elif not path.is_file():
        raise UserError(f"annotations {str(path)!r} not found")
    elif suffix == ".csv":
        yield from _csv_records(path)
    elif suffix in (".json", ".jsonl"):
        yield from _json_records(path)
    elif suffix == ".parquet":
        yield from _table_rows(path, _parquet_batches(path))
    elif suffix == ".arrow":
        yield from _table_rows(path, _arrow_batches(path))
    else:
        raise UserError(f"{path}: a {suffix or 'file without an extension'} file is not understood; annotations are {FILE_TYPES}")


def _text(path: Path) -> str:
    """The file as text (UTF-8, with or without a byte-order mark); other bytes: one line naming where."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array (whatever the suffix) record by record, else JSON Lines."""
    text = _text(path)
    if text.lstrip().startswith("[") or (path.suffix.lower() == ".json" and not _looks_like_json_lines(text)):
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
    """Rows of a CSV with a header; ``images``: ``;``-separated paths, empty for none."""
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    columns = reader.fieldnames or []
    if "images" not in columns:
        close = difflib.get_close_matches("images", columns, n=1, cutoff=0.6)
        hint = f"; did you mean to name {close[0]!r} 'images'?" if close else ""
        raise UserError(f"{path}: no 'images' column (columns: {', '.join(columns) or 'none'}){hint}")
    for row in reader:
        number = reader.line_num
        if None in row:
            yield f"{path}:{number}", BadRecord(f"{path}:{number}", "more values than columns")
            continue
        images = [name.strip() for name in (row.pop("images") or "").split(";") if name.strip()]
        yield f"{path}:{number}", {**row, "images": images}


def _table_rows(path: Path, batches: Iterator[Any]) -> Iterator[tuple[str, Any]]:
    """Rows of record batches as records; a null is a missing key (tables give every row every column)."""
    import pyarrow as pa

    index = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}[{index}]", {name: value for name, value in row.items() if value is not None}
                index += 1
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: unreadable after {index} rows: {type(error).__name__}: {error}") from None


def _parquet_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a Parquet file ({error})") from None
    return table.iter_batches(batch_size=TABLE_ROWS)


def _arrow_batches(path: Path) -> Iterator[Any]:
    """An Arrow IPC file, or an Arrow stream (what ``datasets`` writes in its cache and folders)."""
    import pyarrow as pa

    for open_reader in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            reader = open_reader(pa.memory_map(str(path)))
        except (pa.ArrowException, OSError):
            continue
        return (reader.get_batch(i) for i in range(reader.num_record_batches)) if hasattr(reader, "get_batch") else iter(reader)
    raise UserError(f"{path}: not an Arrow file or stream")


def _saved_dataset_batches(path: Path) -> Iterator[Any]:
    """The rows of a ``datasets`` folder (``save_to_disk``), raw: images stay undecoded structs."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise UserError(f"{path}: a folder, but not one that datasets' save_to_disk wrote ({error}); annotations are "
                        f"{FILE_TYPES}") from None
    if isinstance(saved, datasets.DatasetDict):
        splits = list(saved)
        raise UserError(f"{path} holds the splits {', '.join(splits)}: give one split's folder, e.g. {path / splits[0]}")
    return (batch for table in saved.with_format("arrow").iter(batch_size=TABLE_ROWS) for batch in table.to_batches())
