"""Shards, samples and the batch streams, on real images written into temporary shards by the tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import IMAGES
from vlmtrain.budget import BudgetSchedule
from vlmtrain.data.builder import BatchBuilder, SampleFormat
from vlmtrain.data.datamodule import _unbatched
from vlmtrain.data.pipeline import EvalStream, SkipLog, TrainStream, expand_shards, read_samples
from vlmtrain.data.samples import SampleError, parse_sample
from vlmtrain.data.shards import read_annotations, write_shards
from vlmtrain.errors import UserError
from vlmtrain.geometry import LEVELS, Geometry
from vlmtrain.text import IGNORE_INDEX, TextEncoder, build_byte_tokenizer

GEOMETRY = Geometry(patch_size=16, pool=2)


@pytest.fixture(scope="module")
def builder() -> BatchBuilder:
    text = TextEncoder(build_byte_tokenizer(), "<image>", max_text_length=96)
    return BatchBuilder(GEOMETRY, text, SampleFormat(prompt="<image>", target_field="text"), max_image_pixels=10**8)


def shard_files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_shards_are_deterministic_and_indexed(tmp_path):
    records = list(read_annotations(IMAGES / "captions.jsonl"))
    first = write_shards(records, IMAGES, tmp_path / "a", "s", samples_per_shard=5)
    second = write_shards(records, IMAGES, tmp_path / "b", "s", samples_per_shard=5)
    assert first.shards == {"s-000000.tar": 5, "s-000001.tar": 5, "s-000002.tar": 5, "s-000003.tar": 1}
    for name in first.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    index = json.loads((tmp_path / "a" / "s-index.json").read_text())
    assert index["samples"] == len(records) == 16 and index["shards"] == first.shards


def test_shard_samples_hold_text_sizes_and_original_bytes(caption_dir):
    files = {}
    for shard in sorted(caption_dir.glob("*.tar")):
        files.update(shard_files(shard))
    record = json.loads(files["pair.json"])
    assert record["text"] == "A cat, then a cup of coffee."
    assert record["images"] == [{"name": "0.png", "width": 451, "height": 300}, {"name": "1.png", "width": 600, "height": 400}]
    assert files["pair.0.png"] == (IMAGES / "chelsea.png").read_bytes()
    assert json.loads(files["no_image.json"])["images"] == []
    assert json.loads(files["logo2.json"])["images"][0] == {"name": "0.png", "width": 542, "height": 130}


def test_undecodable_and_missing_images_are_reported_not_written(tmp_path):
    (tmp_path / "broken.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes()[:300])
    records = [
        {"key": "good", "images": ["chelsea.png"], "text": "cat"},
        {"key": "broken", "images": [str(tmp_path / "broken.jpg")], "text": "x"},
        {"key": "missing", "images": ["nope.png"], "text": "x"},
    ]
    report = write_shards(records, IMAGES, tmp_path / "out", "s", samples_per_shard=10)
    assert report.samples == 1
    assert [key for key, _ in report.rejected] == ["broken", "missing"]
    assert {name.split(".")[0] for name in shard_files(tmp_path / "out" / "s-000000.tar")} == {"good"}


def test_bad_annotation_file_is_a_user_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"images": ["a.png"], "text": "x"}\n{not json}\n')
    with pytest.raises(UserError, match="a.jsonl:2: not valid JSON"):
        list(read_annotations(path))


@pytest.mark.parametrize(
    "files, kind",
    [
        ({"__key__": "k"}, "missing_json"),
        ({"__key__": "k", "json": b"{oops"}, "bad_json"),
        ({"__key__": "k", "json": b"[1]"}, "bad_json"),
        ({"__key__": "k", "json": b'{"images": [{"name": "0.jpg"}]}'}, "bad_json"),
        ({"__key__": "k", "json": b'{"images": [{"name": "0.jpg", "width": 5, "height": 5}]}'}, "missing_image"),
    ],
)
def test_malformed_samples_raise_with_their_kind(files, kind):
    with pytest.raises(SampleError) as caught:
        parse_sample(files)
    assert caught.value.kind == kind


def test_a_truncated_shard_delivers_what_it_can_and_counts_the_break(caption_dir, tmp_path):
    shard = caption_dir / "captions-000000.tar"
    truncated = tmp_path / "truncated.tar"
    data = shard.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    skips = SkipLog()
    samples = list(read_samples([str(truncated), str(caption_dir / "captions-000001.tar")], skips))
    assert skips.counts["bad_shard"] == 1
    complete = [s.key for s in read_samples([str(shard)], SkipLog())]
    keys = [s.key for s in samples]
    assert keys[: len(keys) - 4] == complete[: len(keys) - 4] and len(keys) - 4 < len(complete)
    assert keys[-4:] == [s.key for s in read_samples([str(caption_dir / "captions-000001.tar")], SkipLog())]


def test_missing_shards_are_named():
    with pytest.raises(FileNotFoundError, match="2 of 2 shards not found"):
        expand_shards("/nowhere/s-{000000..000001}.tar")


@pytest.mark.parametrize("budget", LEVELS)
def test_real_images_encode_to_the_geometry_at_every_budget(builder, caption_dir, budget):
    samples = list(read_samples(sorted(map(str, caption_dir.glob("*.tar"))), SkipLog()))
    encoded = [builder.encode(sample, budget) for sample in samples]
    batch = builder.collate(encoded, budget, step=0)
    assert batch.size == 16 and batch.images.count == 16  # 14 single, one pair, one text-only
    for row, (sample, item) in enumerate(zip(samples, encoded)):
        expected = [GEOMETRY.image(h, w, budget) for h, w in sample.sizes]
        assert [grid for *_, grid in item.images] == [g.token_grid for g in expected]
        assert [pixels.shape[0] for pixels, *_ in item.images] == [g.patches for g in expected]
        assert int((batch.input_ids[row] == builder.text.image_token_id).sum()) == sum(g.tokens for g in expected) <= budget * len(expected)
        assert torch.equal(batch.labels[row][batch.labels[row] != IGNORE_INDEX][:-1], torch.tensor(builder.text._ids(sample.text("text"))))
    assert batch.images.patch_mask.sum(1).tolist() == (batch.images.token_counts * 4).tolist()


def test_size_mismatch_between_json_and_image_is_caught(builder, caption_dir):
    sample = next(read_samples([str(caption_dir / "captions-000000.tar")], SkipLog()))
    sample.sizes = [(sample.sizes[0][0] + 1, sample.sizes[0][1])]
    with pytest.raises(SampleError) as caught:
        builder.encode(sample, 70)
    assert caught.value.kind == "size_mismatch"


def demo_urls(demo_dir: Path) -> list[str]:
    return expand_shards(f"{demo_dir}/train-{{000000..000003}}.tar")


def test_two_workers_follow_the_schedule_and_the_token_cap(builder, demo_dir):
    schedule = BudgetSchedule(LEVELS, (1.0,) * 5, seed=3)
    stream = TrainStream(demo_urls(demo_dir), builder, schedule, batch_visual_tokens=2240, max_batch_size=8, shuffle_buffer=4)
    loader = DataLoader(stream, batch_size=None, collate_fn=_unbatched, num_workers=2)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 24:
            break
    assert [b.step for b in batches] == list(range(24))
    assert [b.budget for b in batches] == [schedule.sample(step) for step in range(24)]
    assert len({b.budget for b in batches}) == 5
    for b in batches:
        assert 1 <= b.size <= 8 and int(b.images.token_counts.sum()) <= 2240
        assert all(int(t) <= b.budget for t in b.images.token_counts)


def test_a_stream_can_start_at_any_step(builder, demo_dir):
    schedule = BudgetSchedule(LEVELS, (1.0,) * 5, seed=3)
    stream = TrainStream(demo_urls(demo_dir), builder, schedule, 2240, 8, 4, start_step=100)
    first = [b for _, b in zip(range(3), iter(stream))]
    assert [(b.step, b.budget) for b in first] == [(step, schedule.sample(step)) for step in (100, 101, 102)]


def test_matryoshka_batches_hold_the_same_samples_at_every_budget(builder, demo_dir):
    schedule = BudgetSchedule((70, 280), (1.0, 1.0), seed=0, mode="matryoshka")
    batches = next(iter(TrainStream(demo_urls(demo_dir), builder, schedule, 2240, 8, 4)))
    assert [b.budget for b in batches] == [70, 280]
    assert batches[0].keys == batches[1].keys and int(batches[0].images.token_counts.sum() + batches[1].images.token_counts.sum()) <= 2240


def test_fewer_shards_than_workers_is_a_clear_error(builder, demo_dir):
    stream = TrainStream(demo_urls(demo_dir)[:1], builder, BudgetSchedule((70,), (1.0,), 0), 2240, 8, 4)
    with pytest.raises(ValueError, match="1 shards cannot feed 2 data workers"):
        list(stream.samples(worker=0, workers=2))


def test_eval_stream_yields_the_first_samples_in_order_at_one_budget(builder, demo_dir):
    urls = [str(demo_dir / "val-000000.tar")]
    batches = list(EvalStream(urls, builder, budget=140, limit=5, batch_visual_tokens=280, max_batch_size=8))
    keys = [key for b in batches for key in b.keys]
    assert keys == [s.key for s in read_samples(urls, SkipLog())][:5]
    assert {b.budget for b in batches} == {140} and all(int(b.images.token_counts.sum()) <= 280 for b in batches)


def test_bad_samples_are_skipped_and_counted_and_the_rest_delivered(builder, tmp_path):
    good = Image.new("RGB", (40, 30), (200, 10, 10))
    buffer = io.BytesIO()
    good.save(buffer, "PNG")
    records = [(f"s{i}", {"text": f"w{i}", "images": [{"name": "0.png", "width": 40, "height": 30}]}, buffer.getvalue()) for i in range(6)]
    records[1] = ("s1", records[1][1], b"garbage")
    records[3] = ("s3", {"images": [{"name": "0.png", "width": 40, "height": 30}]}, buffer.getvalue())  # no text
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        for key, record, image in records:
            for name, data in ((f"{key}.json", json.dumps(record).encode()), (f"{key}.0.png", image)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = EvalStream([str(shard)], builder, budget=70, limit=10, batch_visual_tokens=1120, max_batch_size=2)
    keys = [key for batch in stream for key in batch.keys]
    assert keys == ["s0", "s2", "s4", "s5"]
    assert stream.skips.counts == {"image": 1, "missing_text": 1}


def test_a_stream_of_only_bad_samples_stops_with_an_error(builder):
    skips = SkipLog(max_consecutive=3)
    for _ in range(3):
        skips.add("image", "bad")
    with pytest.raises(RuntimeError, match="4 samples in a row were unusable"):
        skips.add("image", "bad")
