"""Tables in, the same shards out: Parquet, Arrow files and streams and ``datasets`` folders (images as paths or
as Hugging Face image columns carrying their bytes) become byte-for-byte the shards that JSON gives; keys that
differ are mapped with ``--columns``; a file that cannot be read is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ENV, IMAGES

from vlmtrain.data.annotations import parse_columns, read_annotations
from vlmtrain.data.shards import write_shards
from vlmtrain.errors import UserError


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image", "text": None}  # a table gives every part every key
TRL = [  # TRL's vision records, as datasets such as llava-instruct-mix hold them
    {"id": "cat-coffee", "source": "web", "images": ["chelsea.png", "coffee.png"], "messages": [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [IMAGE, text("\nWhat animal is this?")]},
        {"role": "assistant", "content": [text("A cat.")]},
        {"role": "user", "content": [text("And here? "), IMAGE]},
        {"role": "assistant", "content": [text("A cup of coffee.")]},
    ]},
    {"id": "text-only", "images": [], "messages": [
        {"role": "user", "content": [text("Say hi.")]}, {"role": "assistant", "content": [text("Hi.")]},
    ]},
]
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(pa.struct([("type", pa.string()),
                                                                                            ("text", pa.string())])))]))


def embedded(records: list[dict]) -> list[dict]:
    """``records`` with each image as a Hugging Face image struct holding its bytes."""
    return [{**r, "images": [{"bytes": (IMAGES / name).read_bytes(), "path": name} for name in r["images"]]} for r in records]


def image_feature() -> datasets.Features:
    return datasets.Features({
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Image()),
        "messages": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"),
                                                                      "text": datasets.Value("string")}]}],
    })


def write_parquet(path: Path, records: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(records), path)


def write_arrow_file(path: Path, records: list[dict]) -> None:
    schema = [("id", pa.string()), ("source", pa.string()), ("images", pa.list_(pa.string())), ("messages", MESSAGE_TYPE)]
    table = pa.Table.from_pylist(records, schema=pa.schema(schema))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def write_saved_dataset(path: Path, records: list[dict]) -> None:
    datasets.Dataset.from_list(embedded(records), features=image_feature()).save_to_disk(str(path))


def write_dataset_arrow(path: Path, records: list[dict]) -> None:
    """The Arrow stream inside a save_to_disk folder: what datasets keeps in its cache."""
    write_saved_dataset(path.with_suffix(".saved"), records)
    next(path.with_suffix(".saved").glob("*.arrow")).rename(path)


WRITERS = {  # how: (file name, writer, whether the images travel inside the file)
    "parquet, image paths": ("a.parquet", write_parquet, False),
    "parquet, image bytes": ("a.parquet", lambda path, records: write_parquet(path, embedded(records)), True),
    "arrow file": ("a.arrow", write_arrow_file, False),
    "arrow stream of datasets": ("a.arrow", write_dataset_arrow, True),
    "datasets folder": ("folder", write_saved_dataset, True),
}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


@pytest.mark.parametrize("how", WRITERS)
def test_a_table_gives_byte_for_byte_the_shards_its_json_gives(tmp_path, how):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in TRL))
    name, write, inside = WRITERS[how]
    write(tmp_path / name, TRL)
    from_json = read_annotations(tmp_path / "a.jsonl")
    from_table = read_annotations(tmp_path / name)
    assert not from_table.bad and from_table.formats == {"messages": 2}
    assert from_table.unread == from_json.unread == {"source": 1}  # a table's null in the other row is no key
    write_shards(from_json.records, IMAGES, tmp_path / "json", "s", 10)
    write_shards(from_table.records, tmp_path / "empty" if inside else IMAGES, tmp_path / "table", "s", 10)
    expected = shard_bytes(tmp_path / "json")
    assert expected and shard_bytes(tmp_path / "table") == expected


def test_columns_map_a_files_keys_to_the_ones_read(tmp_path):
    # LLaMA-Factory's dataset_info.json: "columns": {"messages": "dialog", "images": "pics"}, ShareGPT turns
    sharegpt = [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A cat."}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"uid": "a", "dialog": sharegpt, "pics": ["chelsea.png"], "prompt": "Be brief."}]))
    (record,) = read_annotations(path, columns=parse_columns("messages=dialog,images=pics,id=uid,system=prompt")).records
    assert record["key"] == "a" and record["images"] == ["chelsea.png"]
    assert record["messages"] == [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [{"type": "image"}, text("What is it?")]},
        {"role": "assistant", "content": [text("A cat.")]},
    ]
    with pytest.raises(UserError, match=r"^--columns images=image: no record of .* has such a key$"):
        read_annotations(path, columns={"images": "image"})
    with pytest.raises(UserError, match=r"^--columns: pictures is not a key vlmtrain reads \(those: messages, images"):
        parse_columns("pictures=pics")
    with pytest.raises(UserError, match=r"must look like messages=conversations,images=image"):
        parse_columns("messages")


@pytest.mark.parametrize("name, content, message", [
    ("a.txt", b"{}", r"a\.txt: a \.txt file is not understood; annotations are \.jsonl or \.json"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"a\.jsonl:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
    ("a.parquet", b"PAR1 not really", r"a\.parquet: not a Parquet file"),
    ("a.arrow", b"ARROW1 not really", r"a\.arrow: not an Arrow file or stream"),
])
def test_a_file_that_cannot_be_read_is_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_annotations(tmp_path / name)


def test_a_json_array_in_a_jsonl_file_is_read_as_the_array(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(TRL, indent=2))
    assert [r["key"] for r in read_annotations(tmp_path / "a.jsonl").records] == ["cat-coffee", "text-only"]


def test_a_dataset_with_splits_names_them_and_a_binary_column_is_refused(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(TRL), "test": datasets.Dataset.from_list(TRL)})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UserError, match=r"dict holds the splits train, test: give one split's folder, e.g. .*dict/train$"):
        read_annotations(tmp_path / "dict")
    assert len(read_annotations(tmp_path / "dict" / "train").records) == 2
    write_parquet(tmp_path / "b.parquet", [{**TRL[1], "thumbnail": b"\x89PNG"}])
    (bad,) = read_annotations(tmp_path / "b.parquet").bad
    assert str(bad) == (f"{tmp_path}/b.parquet[0]: 'thumbnail' holds binary data, which is not an image column vlmtrain reads "
                        "(map it with --columns images=thumbnail)")


@pytest.mark.slow
def test_the_cli_writes_a_datasets_folder_with_embedded_images_without_an_images_folder(tmp_path):
    write_saved_dataset(tmp_path / "folder", TRL)
    result = subprocess.run([sys.executable, "-m", "vlmtrain.cli", "shards", str(tmp_path / "folder"), str(tmp_path / "out")],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'folder'}: 2 records (2 messages)" in result.stdout and "wrote 2 samples in 1 shards" in result.stdout
