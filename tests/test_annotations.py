"""Annotation files: LLaVA JSON/JSONL, "messages" records and prompt/target records become shards holding one
conversation form; every malformed record is reported with its line or index and its reason."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import ENV, IMAGES

from vlmtrain.data.annotations import read_annotations
from vlmtrain.data.shards import write_shards
from vlmtrain.errors import UserError

LLAVA = [
    {"id": "cat-coffee", "image": ["chelsea.png", "coffee.png"], "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\nWhat animal is this?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "And here? <image>"},
        {"from": "gpt", "value": "A cup of coffee."},
    ]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
]
MESSAGES = [
    {"id": "cat-coffee", "images": ["chelsea.png", "coffee.png"], "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat animal is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And here? <image>"},
        {"role": "assistant", "content": "A cup of coffee."},
    ]},
    {"id": "text-only", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
]
STORED = [  # the one form both become
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat animal is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "And here? "}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cup of coffee."}]},
]


def shard_records(out: Path) -> dict[str, dict]:
    records = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    records[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    return records


@pytest.mark.parametrize("name, content", [
    ("llava.json", json.dumps(LLAVA)),
    ("llava.jsonl", "\n".join(json.dumps(r) for r in LLAVA)),
    ("messages.jsonl", "\n".join(json.dumps(r) for r in MESSAGES)),
    ("messages.json", json.dumps(MESSAGES)),
])
def test_llava_and_messages_files_become_one_stored_conversation_form(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    annotations = read_annotations(path)
    assert not annotations.bad and sum(annotations.formats.values()) == 2
    write_shards(annotations.records, IMAGES, tmp_path / "out", "s", samples_per_shard=10)
    records = shard_records(tmp_path / "out")
    assert records["cat-coffee"]["messages"] == STORED
    assert [entry["name"] for entry in records["cat-coffee"]["images"]] == ["0.png", "1.png"]
    assert [(entry["width"], entry["height"]) for entry in records["cat-coffee"]["images"]] == [(451, 300), (600, 400)]
    assert records["text-only"]["images"] == [] and records["text-only"]["messages"][1]["role"] == "assistant"


def test_budgets_given_per_image_are_stored_with_the_images(tmp_path):
    record = {
        "key": "b",
        "images": ["chelsea.png", "coffee.png"],
        "budgets": [1120, None],
        "messages": [
            {"role": "user", "content": "<image><image>Read the first, glance at the second."},
            {"role": "assistant", "content": "ok"},
        ],
    }
    parts = {
        "key": "p",
        "images": ["chelsea.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image", "budget": 70}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat."},
        ],
    }
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(parts) + "\n")
    write_shards(read_annotations(path).records, IMAGES, tmp_path / "out", "s", 10)
    stored = shard_records(tmp_path / "out")
    assert [entry.get("budget") for entry in stored["b"]["images"]] == [1120, None]
    assert [entry.get("budget") for entry in stored["p"]["images"]] == [70]


BAD = [
    ("not json", "not valid JSON"),
    ([1, 2], "a record must be a JSON object"),
    ({"image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]}, "turn 1: unknown role 'robot'"),
    (
        {"conversations": [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Hi"}]},
        "the first turn is from the assistant",
    ),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}, "turn 2: empty assistant turn"),
    (
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> Hi"}, {"from": "gpt", "value": "x"}]},
        "1 image markers for 2 images (an image listed but never placed)",
    ),
    (
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
        "2 image markers for 1 images",
    ),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "no assistant turn"),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>"}], "images": ["a.png"]},
        "turn 2: an image in a turn of the assistant (images go in user turns)",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "Late."},
                {"role": "assistant", "content": "x"},
            ]
        },
        "turn 2: a system turn after the first turn",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "sound"}]}, {"role": "assistant", "content": "x"}]},
        "turn 1: a content part must be {'type': 'text', 'text': ...}, {'type': 'image', ...} or {'type': 'video', ...}, "
        "found type 'sound'",
    ),
    (  # videos and their markers must match, whatever way a record gives them (LLaMA-Factory, TRL, OpenAI)
        {"messages": [{"role": "user", "content": [{"type": "video", "video": 5}]}, {"role": "assistant", "content": "x"}]},
        "turn 1: a video part's video must be a video file's path or a list of its frames' image paths",
    ),
    (
        {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "x"}], "videos": ["a.mp4"]},
        "0 video markers for 1 videos (a video listed but never placed)",
    ),
    (
        {"conversations": [{"from": "human", "value": "<audio>Who?"}, {"from": "gpt", "value": "x"}]},
        "a <audio> marker: vlmtrain trains images, videos and text (no audio yet)",
    ),
    (  # a marker without a videos list (found by scripts/mutants.py: only the list was tested)
        {"conversations": [{"from": "human", "value": "<video>What happens?"}, {"from": "gpt", "value": "x"}]},
        "1 video markers for 0 videos",
    ),
    (
        {"conversations": [{"from": "human", "value": "<video>Hm?"}, {"from": "gpt", "value": "<video>"}], "videos": ["a.mp4"]},
        "turn 2: a video in a turn of the assistant (videos go in user turns)",
    ),
    ({"videos": ["a.mp4"], "text": "x"}, "videos train in conversations only (a 'messages' or 'conversations' record)"),
    (
        {"messages": [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "x"}], "audios": ["a.wav"]},
        "'audios': vlmtrain trains images, videos and text (no audio yet)",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}, {"role": "assistant", "content": "x"}]},
        "turn 1: a 'input_audio' part",
    ),
    (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}]},
        "turn 2: a tool turn ('function_call'): vlmtrain trains system, user and assistant turns only (no tool calls yet)",
    ),
    (
        {"system": "Be brief.", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "x"}]},
        "a 'system' column and a system turn: give the system prompt once",
    ),
    (
        {
            "images": ["a.png"],
            "budgets": [100],
            "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
        },
        "image 1: budget 100 is not one of 70, 140, 280, 560, 1120",
    ),
    ({"image": "a.png", "text": "x"}, "'image' is not a field of prompt/target records; use 'images'"),
    ({"images": "a.png", "text": "x"}, "'images' must be a list of paths"),
]


def test_every_malformed_record_is_reported_with_its_line_and_reason(tmp_path):
    lines = [json.dumps({"key": "good", "images": ["chelsea.png"], "text": "cat"})]
    lines += [value if isinstance(value, str) else json.dumps(value) for value, _ in BAD]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    annotations = read_annotations(path)
    assert [record["key"] for record in annotations.records] == ["good"]
    found = [str(bad) for bad in annotations.bad]
    expected = [f"{path}:{number}: {reason}" for number, (_, reason) in enumerate(BAD, start=2)]
    assert len(found) == len(expected)
    for line, start in zip(found, expected, strict=True):
        assert line.startswith(start), (line, start)


def test_a_llava_json_array_reports_records_by_index(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([LLAVA[0], {"conversations": [{"from": "gpt", "value": "x"}]}, LLAVA[1]]))
    assert [str(bad) for bad in read_annotations(path).bad] == [
        f"{path}[1]: the first turn is from the assistant (a conversation starts with the user)"
    ]


def test_a_forced_format_refuses_records_of_another(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(LLAVA[1]) + "\n" + json.dumps({"images": [], "text": "x"}) + "\n")
    assert [str(bad).split(": ", 1)[1] for bad in read_annotations(path, "records").bad] == [
        "a conversation, but --format records was asked for"
    ]
    assert [str(bad).split(": ", 1)[1] for bad in read_annotations(path, "llava").bad] == [
        "'conversations' must be a list of turns"
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "key,image,text\na,chelsea.png,cat\n",
            "no 'images' column (columns: key, image, text); did you mean to name 'image' 'images'?",
        ),
        ("key,text\na,cat\n", "no 'images' column (columns: key, text)"),
    ],
)
def test_a_csv_without_an_images_column_is_refused(tmp_path, content, message):
    path = tmp_path / "a.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        read_annotations(path)


def test_a_json_file_that_is_not_a_list_is_refused(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"conversations": []')
    with pytest.raises(UserError, match="a.json: not valid JSON"):
        read_annotations(path)
    path.write_text('{"conversations": []}')
    with pytest.raises(UserError, match="must hold a list of records"):
        read_annotations(path)


def shards_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", "shards", *args], capture_output=True, text=True, env=ENV, cwd=tmp_path
    )


@pytest.mark.slow
def test_the_cli_writes_nothing_when_a_record_is_bad_and_the_rest_with_skip_bad(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([json.dumps(MESSAGES[0]), json.dumps(BAD[3][0]), "{oops", json.dumps(MESSAGES[1])]) + "\n")
    refused = shards_cli(tmp_path, str(path), str(tmp_path / "out"), "--images", str(IMAGES))
    assert refused.returncode == 2 and not (tmp_path / "out").exists()
    assert refused.stderr.splitlines() == [
        f"error: {path}:2: the first turn is from the assistant (a conversation starts with the user)",
        f"error: {path}:3: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        "error: 2 of 4 records are malformed; nothing written (--skip-bad writes the other 2)",
    ]
    written = shards_cli(tmp_path, str(path), str(tmp_path / "out"), "--images", str(IMAGES), "--skip-bad")
    assert written.returncode == 0, written.stderr
    assert f"left out {path}:2: the first turn" in written.stdout and "wrote 2 samples in 1 shards" in written.stdout
    index = json.loads((tmp_path / "out" / "shard-index.json").read_text())
    assert index["samples"] == 2 and len(index["left_out"]) == 2
    assert sorted(shard_records(tmp_path / "out")) == ["cat-coffee", "text-only"]


def test_messages_may_name_their_images_inside_the_parts(tmp_path):
    inline = {"key": "i", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "chelsea.png"}, {"type": "text", "text": "What?"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "coffee.png"}}]},
        {"role": "assistant", "content": "A cat and a coffee."}]}
    both = {**inline, "key": "b", "images": ["chelsea.png", "coffee.png"]}
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(inline) + "\n" + json.dumps(both) + "\n")
    annotations = read_annotations(path)
    assert [record["images"] for record in annotations.records] == [["chelsea.png", "coffee.png"]]
    reasons = [str(bad).split(": ", 1)[1] for bad in annotations.bad]
    assert reasons == ["images are named both in 'images' and in image parts; name them in one place"]


def test_a_system_column_becomes_the_first_turn_and_every_other_key_is_counted(tmp_path):
    # ShareGPT / LLaMA-Factory keep the system prompt beside the turns: it is trained as the system turn, not dropped
    path = tmp_path / "a.json"
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    path.write_text(json.dumps([
        {"id": "a", "system": "Be brief.", "source": "web", "conversations": sharegpt},
        {"id": "b", "system": "Be kind.", "messages": messages},
    ]))
    annotations = read_annotations(path)
    system = [record["messages"][0] for record in annotations.records]
    assert system == [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "system", "content": [{"type": "text", "text": "Be kind."}]}]
    assert [len(record["messages"]) for record in annotations.records] == [3, 3]
    assert annotations.unread == {"source": 1} and "system" not in annotations.records[0]


def test_records_repeating_an_id_get_keys_of_their_own_and_keep_their_id(tmp_path):
    # files mixed from several sources repeat ids (often an image's file name): nothing is refused for it
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"id": "cat.png", "images": [], "text": t}) for t in ("a", "b", "c")) + "\n")
    annotations = read_annotations(path)
    assert [(r["key"], r["id"], r["text"]) for r in annotations.records] == [
        ("cat_png", "cat.png", "a"), ("cat_png_2", "cat.png", "b"), ("cat_png_3", "cat.png", "c")
    ]
    assert annotations.renamed == 2 and annotations.bad == []


def test_llama_factory_v1_parts_are_read(tmp_path):
    path = tmp_path / "v1.jsonl"
    question = [{"type": "image_url", "value": "a.png"}, {"type": "text", "value": "What?"}]
    record = {"messages": [{"role": "user", "content": question},
                           {"role": "assistant", "content": [{"type": "text", "value": "A cat."}]}]}
    path.write_text(json.dumps(record) + "\n")
    (stored,) = read_annotations(path).records
    assert stored["images"] == ["a.png"] and stored["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--images", "{tmp}/nowhere"),
            "error: --images {tmp}/nowhere: no such folder (image and video paths are relative to it)",
        ),
        (("--images", "{tmp}"), "error: 1 of 1 records are malformed; nothing written (--skip-bad writes the other 0)"),
        (("--images", "{tmp}", "--skip-bad"), "error: no usable record in {tmp}/chat.jsonl: nothing written"),
        (("--images", "{images}", "--samples-per-shard", "0"), "argument --samples-per-shard: must be >= 1, got 0"),
    ],
)
def test_shards_that_would_write_nothing_exit_2_with_one_line(tmp_path, args, message):
    # exit 0 only when samples were written: a wrong --images folder once wrote 0 samples and exited 0
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(MESSAGES[0]) + "\n")  # two images, which --images {tmp} does not hold
    args = [arg.format(tmp=tmp_path, images=IMAGES) for arg in args]
    result = shards_cli(tmp_path, str(path), str(tmp_path / "out"), *args)
    assert result.returncode == 2 and message.format(tmp=tmp_path) in result.stderr.splitlines()[-1], result.stderr
    assert not list(tmp_path.glob("out/*.tar"))
