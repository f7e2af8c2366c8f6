"""Shards, samples and the batch streams, on real images written into temporary shards by the tests."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from helpers import IMAGES, record, write_tar
from PIL import Image
from torch.utils.data import DataLoader

from vlmtrain.budget import BudgetSchedule
from vlmtrain.data.annotations import read_annotations
from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import BatchingConfig, DataConfig, DecodingConfig, TextConfig
from vlmtrain.data.datamodule import _unbatched
from vlmtrain.data.images import decode_image
from vlmtrain.data.pipeline import DataError, EvalStream, SkipLog, StreamState, TrainStream
from vlmtrain.data.samples import RawSample, SampleError, parse_sample
from vlmtrain.data.shards import write_shards
from vlmtrain.data.sources import ShardSequence, Source, StreamId, expand_shards, read_shard
from vlmtrain.errors import UserError
from vlmtrain.modeling.geometry import LEVELS, Geometry
from vlmtrain.modeling.tokenizers import IGNORE_INDEX, build_byte_tokenizer
from vlmtrain.text.encoding import TextEncoder

GEOMETRY = Geometry(patch_size=16, pool=2)
UNIFORM = BudgetSchedule(LEVELS, (1.0,) * 5, seed=3)


@pytest.fixture(scope="module")
def builder() -> BatchBuilder:
    text = TextEncoder(build_byte_tokenizer(), "<image>")
    return BatchBuilder(
        GEOMETRY, text, TextConfig(prompt="<image>", target_field="text", max_length=96), DecodingConfig(max_image_pixels=10**8)
    )


def good_samples(urls: list[str]) -> list[RawSample]:
    return [s for url in urls for s in read_shard(url) if isinstance(s, RawSample)]


def shard_files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def png(width: int, height: int, color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def demo_sources(demo_dir: Path) -> list[Source]:
    return [Source(tuple(expand_shards(f"{demo_dir}/train-{{000000..000003}}.tar")))]


def settings(max_consecutive_failures: int = 1000, **batching) -> DataConfig:
    """Data settings of the stream tests: small batches from a small lookahead."""
    values = {"batch_tokens": 2400, "max_batch_size": 8, "lookahead": 8, "max_wait": 8}
    return DataConfig(max_consecutive_failures=max_consecutive_failures, batching=BatchingConfig(**{**values, **batching}))


# ---------------------------------------------------------------- writing shards


def test_shards_are_deterministic_and_indexed(tmp_path):
    records = read_annotations(IMAGES / "captions.jsonl").records
    first = write_shards(records, IMAGES, tmp_path / "a", "s", samples_per_shard=5)
    second = write_shards(records, IMAGES, tmp_path / "b", "s", samples_per_shard=5)
    assert first.shards == second.shards == {"s-000000.tar": 5, "s-000001.tar": 5, "s-000002.tar": 5, "s-000003.tar": 1}
    for name in first.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    index = json.loads((tmp_path / "a" / "s-index.json").read_text())
    assert index["samples"] == len(records) == 16 and index["shards"] == first.shards


def test_shard_samples_hold_text_sizes_and_original_bytes(caption_dir):
    files = {}
    for shard in sorted(caption_dir.glob("*.tar")):
        files.update(shard_files(shard))
    stored = json.loads(files["pair.json"])
    assert stored["text"] == "A cat, then a cup of coffee."
    assert stored["images"] == [{"name": "0.png", "width": 451, "height": 300}, {"name": "1.png", "width": 600, "height": 400}]
    assert files["pair.0.png"] == (IMAGES / "chelsea.png").read_bytes()
    assert json.loads(files["no_image.json"])["images"] == []
    assert json.loads(files["logo2.json"])["images"][0] == {"name": "0.png", "width": 542, "height": 130}


def test_undecodable_missing_and_outside_images_are_reported_not_written(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "broken.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes()[:300])
    (root / "cat.png").write_bytes((IMAGES / "chelsea.png").read_bytes())
    (root / "link.png").symlink_to(IMAGES / "coffee.png")
    records = [
        {"key": "good", "images": ["cat.png"], "text": "cat"},
        {"key": "broken", "images": ["broken.jpg"], "text": "x"},
        {"key": "missing", "images": ["nope.png"], "text": "x"},
        {"key": "up", "images": ["../images/../../etc/passwd"], "text": "x"},
        {"key": "absolute", "images": [str(IMAGES / "coffee.png")], "text": "x"},
        {"key": "symlink", "images": ["link.png"], "text": "x"},
    ]
    report = write_shards(records, root, tmp_path / "out", "s", samples_per_shard=10)
    assert report.samples == 1
    assert [key for key, _ in report.rejected] == ["broken", "missing", "up", "absolute", "symlink"]
    assert all("outside" in reason for key, reason in report.rejected[2:])
    assert {name.split(".")[0] for name in shard_files(tmp_path / "out" / "s-000000.tar")} == {"good"}
    allowed = write_shards(records[4:], root, tmp_path / "allowed", "s", samples_per_shard=10, outside_images=True)
    assert allowed.samples == 2 and not allowed.rejected
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "allowed").glob("*.tmp"))


def test_csv_annotations_give_the_same_shards_as_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"key": "pair", "images": ["chelsea.png", "coffee.png"], "question": "What?", "answer": "A cat, then coffee."}\n'
        '{"key": "none", "images": [], "question": "Hi?", "answer": "Hello."}\n'
    )
    (tmp_path / "a.csv").write_text(
        'key,images,question,answer\npair,chelsea.png;coffee.png,What?,"A cat, then coffee."\nnone,,Hi?,Hello.\n'
    )
    from_jsonl = write_shards(read_annotations(tmp_path / "a.jsonl").records, IMAGES, tmp_path / "j", "s", 10)
    from_csv = write_shards(read_annotations(tmp_path / "a.csv").records, IMAGES, tmp_path / "c", "s", 10)
    assert from_jsonl.shards == from_csv.shards == {"s-000000.tar": 2}
    assert (tmp_path / "j" / "s-000000.tar").read_bytes() == (tmp_path / "c" / "s-000000.tar").read_bytes()


def test_shards_close_before_their_size_limit_and_workers_do_not_change_the_output(tmp_path):
    records = read_annotations(IMAGES / "captions.jsonl").records
    limit = 1_200_000
    one = write_shards(records, IMAGES, tmp_path / "one", "s", samples_per_shard=100, max_shard_bytes=limit)
    two = write_shards(records, IMAGES, tmp_path / "two", "s", samples_per_shard=100, max_shard_bytes=limit, workers=2)
    assert one.shards == two.shards and len(one.shards) > 2 and one.samples == 16
    for name in one.shards:
        data = (tmp_path / "one" / name).read_bytes()
        assert data == (tmp_path / "two" / name).read_bytes()
        assert len(data) <= limit + 10240 or one.shards[name] == 1  # a single sample larger than the limit gets its own shard


# ---------------------------------------------------------------- reading samples


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


def test_a_truncated_shard_delivers_what_it_can_and_says_it_broke(caption_dir, tmp_path):
    shard = caption_dir / "captions-000000.tar"
    data = shard.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    items = list(read_shard(str(truncated)))
    assert isinstance(items[-1], SampleError) and items[-1].kind == "bad_shard"
    complete = [s.key for s in good_samples([str(shard)])]
    delivered = [s.key for s in items if isinstance(s, RawSample)]
    assert delivered == complete[: len(delivered)] and 0 < len(delivered) < len(complete)


def test_missing_shards_are_named():
    with pytest.raises(FileNotFoundError, match="2 of 2 shards not found"):
        expand_shards("/nowhere/s-{000000..000001}.tar")


def test_pipe_urls_are_read(caption_dir):
    shard = caption_dir / "captions-000000.tar"
    assert [s.key for s in good_samples([f"pipe:cat {shard}"])] == [s.key for s in good_samples([str(shard)])]


# ---------------------------------------------------------------- decoding and encoding


@pytest.mark.parametrize("budget", LEVELS)
def test_real_images_encode_to_the_geometry_at_every_budget(builder, caption_dir, budget):
    samples = good_samples(sorted(map(str, caption_dir.glob("*.tar"))))
    encoded = [builder.encode(sample, budget) for sample in samples]
    batch = builder.collate(encoded, budget).inputs
    assert batch.size == 16 and batch.images.count == 16  # 14 single, one pair, one text-only
    assert batch.input_ids.shape == (1, sum(len(item.text.input_ids) for item in encoded))  # one packed row
    samples_of_tokens = batch.sequence_ids[0]
    for row, (sample, item) in enumerate(zip(samples, encoded, strict=True)):
        expected = [GEOMETRY.image(h, w, budget) for h, w in sample.sizes]
        assert [geometry for *_, geometry in item.images] == expected
        assert [pixels.shape[0] for pixels, *_ in item.images] == [g.patches for g in expected]
        ids, labels = batch.input_ids[0][samples_of_tokens == row], batch.labels[0][samples_of_tokens == row]
        assert int((ids == builder.text.image_token_id).sum()) == sum(g.tokens for g in expected) <= budget * len(expected)
        target = labels[labels != IGNORE_INDEX][:-1]
        assert builder.text.tokenizer.decode(target) == sample.text("text")
    assert batch.images.patch_counts.tolist() == (batch.images.token_counts * 4).tolist()
    assert batch.images.pixels.shape[0] == int(batch.images.patch_counts.sum())  # images packed: nothing padded


def test_size_mismatch_between_json_and_image_is_caught(builder, caption_dir):
    sample = good_samples([str(caption_dir / "captions-000000.tar")])[0]
    sample.sizes = [(sample.sizes[0][0] + 1, sample.sizes[0][1])]
    with pytest.raises(SampleError) as caught:
        builder.encode(sample, 70)
    assert caught.value.kind == "size_mismatch"


def test_jpeg_decodes_at_reduced_scale_close_to_a_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, size=(40, 60, 3)), np.ones((40, 40, 1))).astype(np.uint8)  # 1600x2400
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, "JPEG", quality=95)
    target = (300, 450)
    reduced = decode_image(buffer.getvalue(), 10**8, (1600, 2400), target)
    full = decode_image(buffer.getvalue(), 10**8, (1600, 2400))
    assert full.size == (2400, 1600) and (450, 300) <= reduced.size < (1200, 800)
    a = np.asarray(reduced.resize((450, 300), Image.Resampling.BICUBIC), dtype=float)
    b = np.asarray(full.resize((450, 300), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(a - b).mean() < 3.0


# ---------------------------------------------------------------- training streams


@pytest.mark.parametrize("packing", [True, False])
def test_two_workers_follow_the_schedule_and_the_token_cap(builder, demo_dir, packing):
    stream = TrainStream(demo_sources(demo_dir), builder, UNIFORM, settings(packing=packing))
    loader = DataLoader(stream, batch_size=None, collate_fn=_unbatched, num_workers=2)
    steps = list(islice(loader, 30))
    assert [step.index for step in steps] == list(range(30))
    assert [step.budgets for step in steps] == [(UNIFORM.sample(index),) for index in range(30)]
    assert [step.position.stream for step in steps] == [index % 2 for index in range(30)]
    for step in steps:
        (batch,) = step.batches
        images = batch.inputs.images
        assert 1 <= batch.size <= 8 and batch.tokens <= 2400
        assert batch.tokens == sum(int((batch.inputs.sample_ids == row).sum()) for row in range(batch.size))
        assert batch.grids == [tuple(grid) for grid in images.token_grids.tolist()]
        assert all(int(t) <= batch.budget for t in images.token_counts)
        if packing:  # one row, nothing padded, any grids
            assert batch.inputs.input_ids.shape == (1, batch.tokens) and batch.padding == 0.0
        else:  # one bucket: one token grid
            assert len(set(batch.grids)) == 1 and batch.inputs.input_ids.shape[0] == batch.size


def collect(stream: TrainStream, index: int, count: int, steps: int) -> list:
    """The one batch of each of the stream's first ``steps`` steps (one budget per step)."""
    return [step.batches[0] for step in islice(stream.steps(index, count, first_step=index), steps)]


@pytest.mark.slow
def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(builder, demo_dir):
    keys = [s.key for s in good_samples(list(demo_sources(demo_dir)[0].urls))]
    seen: Counter = Counter()
    for rank in (0, 1):
        stream = TrainStream(demo_sources(demo_dir), builder, UNIFORM, settings(), rank=rank, world=2)
        for step in islice(DataLoader(stream, batch_size=None, collate_fn=_unbatched, num_workers=2), 80):
            seen.update(zip(step.batches[0].keys, step.batches[0].epochs, strict=True))
    for epoch in (0, 1):
        assert sorted(key for (key, e), n in seen.items() for _ in range(n) if e == epoch) == sorted(keys), epoch


def test_ranks_and_streams_read_disjoint_shards_in_an_epoch(demo_dir):
    sources = demo_sources(demo_dir)
    shards = [ShardSequence(sources, 3, StreamId(rank, 2, index, 2), resampled=False) for rank in (0, 1) for index in (0, 1)]
    for epoch in (0, 1, 5):
        firsts = [sequence.shard(epoch * sequence.per_epoch)[0] for sequence in shards]
        assert sorted(firsts) == sorted(sources[0].urls)
    assert shards[0].epoch_order(0) != shards[0].epoch_order(1)


def test_resume_continues_exactly_where_the_batches_left_off(builder, demo_dir):
    stream = TrainStream(demo_sources(demo_dir), builder, UNIFORM, settings(lookahead=6))
    loader = DataLoader(stream, batch_size=None, collate_fn=_unbatched, num_workers=2)
    uninterrupted = list(islice(loader, 25))
    cut = 11
    states = {step.position.stream: StreamState.from_dict(step.position.state) for step in uninterrupted[:cut]}
    resumed_stream = TrainStream(demo_sources(demo_dir), builder, UNIFORM, settings(lookahead=6), start_step=cut, states=states)
    resumed = list(islice(DataLoader(resumed_stream, batch_size=None, collate_fn=_unbatched, num_workers=2), 25 - cut))

    def summary(step):
        return step.index, step.budgets, step.batches[0].keys, step.batches[0].epochs

    assert [summary(step) for step in resumed] == [summary(step) for step in uninterrupted[cut:]]
    for ours, theirs in zip(resumed, uninterrupted[cut:], strict=True):
        ours, theirs = ours.batches[0].inputs, theirs.batches[0].inputs
        assert (ours.input_ids == theirs.input_ids).all() and (ours.images.pixels == theirs.images.pixels).all()


def test_an_image_the_geometry_cannot_serve_makes_its_sample_a_counted_skip():
    # Qwen's processors refuse images more elongated than 200:1: such a sample is unusable, not a crash
    geometry = Geometry(14, 2, rule="smart_resize", min_pixels=3136)
    qwen = BatchBuilder(geometry, chat_builder().text, TextConfig(), DecodingConfig())
    sample = RawSample("thin", {"text": "x"}, [png(600, 2)], [(2, 600)], budgets=[None])
    with pytest.raises(SampleError, match=r"^sample 'thin': a 600x2 image is more elongated than 200:1") as caught:
        qwen.visual_tokens(sample, 70)
    assert caught.value.kind == "image_size"


def test_a_resume_from_any_step_even_mid_shard_repeats_the_uninterrupted_steps(builder, demo_dir):
    # cuts at every step: most saved states sit inside a shard with samples waiting in the pool, where reading
    # one sample too many or too few changes the steps that follow
    def run(**resume) -> list:
        stream = TrainStream(demo_sources(demo_dir), builder, UNIFORM, settings(lookahead=5, max_batch_size=3), **resume)
        steps = DataLoader(stream, batch_size=None, collate_fn=_unbatched, num_workers=0)
        return list(islice(steps, 11 - resume.get("start_step", 0)))

    def summary(step) -> tuple:
        return step.index, step.budgets, step.batches[0].keys, step.batches[0].epochs

    uninterrupted = run()
    mid_shard = 0
    for cut in range(1, 10):
        state = StreamState.from_dict(uninterrupted[cut - 1].position.state)
        mid_shard += state.read[1] > 0 and bool(state.pool)
        resumed = run(start_step=cut, states={uninterrupted[cut - 1].position.stream: state})
        assert [summary(step) for step in resumed] == [summary(step) for step in uninterrupted[cut:]], cut
    assert mid_shard >= 4, mid_shard


def test_bad_input_is_skipped_and_counted_and_every_good_sample_delivered(builder, tmp_path):
    good = [(f"g{i}.json", record(f"w{i}", (40, 30))) for i in range(6)]
    good = [item for i, (name, data) in enumerate(good) for item in ((name, data), (f"g{i}.0.png", png(40, 30)))]
    bad = [
        ("corrupt.json", record("x", (40, 30))),
        ("corrupt.0.png", b"not a png"),
        ("truncated.json", record("x", (40, 30))),
        ("truncated.0.png", png(40, 30)[:60]),
        ("noimage.json", record("x", (40, 30))),
        ("notext.json", record(None, (40, 30))),
        ("notext.0.png", png(40, 30)),
        ("badjson.json", b"{broken"),
        ("badjson.0.png", png(40, 30)),
        ("nojson.0.png", png(40, 30)),
        ("wrongsize.json", record("x", (41, 30))),
        ("wrongsize.0.png", png(40, 30)),
    ]
    first = write_tar(tmp_path / "a.tar", good[:6] + bad + good[6:])
    broken = write_tar(
        tmp_path / "b.tar",
        [
            ("h.json", record("h", (40, 30))),
            ("h.0.png", png(40, 30)),
            ("i.json", record("i", (40, 30))),
            ("i.0.png", png(40, 30)),
        ],
    )
    Path(broken).write_bytes(Path(broken).read_bytes()[: 3 * 1024 + 200])  # h whole, i's JSON, then a cut header
    stream = TrainStream([Source((first, broken))], builder, BudgetSchedule((70,), (1.0,), 0), settings(lookahead=4))
    steps = list(islice(stream.steps(0, 1, first_step=0), 12))
    epoch0 = sorted(key for step in steps for key, e in zip(step.batches[0].keys, step.batches[0].epochs, strict=True) if e == 0)
    assert epoch0 == ["g0", "g1", "g2", "g3", "g4", "g5", "h"]
    skipped = steps[-1].position.state["skipped"]
    assert set(skipped) == {"image", "missing_image", "missing_text", "bad_json", "missing_json", "size_mismatch", "bad_shard"}
    assert skipped["image"] >= 2 and skipped["missing_image"] >= 2  # corrupt + truncated image; no file + cut shard


def test_a_stream_of_only_bad_samples_stops_with_an_error_naming_the_shard(builder, tmp_path):
    shard = write_tar(tmp_path / "bad.tar", [(f"s{i}.json", b"{broken") for i in range(5)])
    stream = TrainStream([Source((shard,))], builder, UNIFORM, settings(max_consecutive_failures=20))
    with pytest.raises(DataError, match="samples in a row were unusable.*bad.tar"):
        next(stream.steps(0, 1, 0))


def test_fewer_shards_than_ranks_times_workers_is_a_clear_error(demo_dir):
    sources = [Source(demo_sources(demo_dir)[0].urls[:3])]
    with pytest.raises(UserError, match="3 shards cannot feed 2 ranks x 2 data workers"):
        ShardSequence(sources, 0, StreamId(1, 2, 1, 2), resampled=False)
    ShardSequence(sources, 0, StreamId(1, 2, 1, 2), resampled=True)  # resampling never runs out


def test_resampled_sources_follow_their_weights(demo_dir):
    urls = demo_sources(demo_dir)[0].urls
    sources = [Source(urls[:1], weight=3.0), Source(urls[1:], weight=1.0)]
    sequence = ShardSequence(sources, 0, StreamId(0, 1, 0, 1), resampled=True)
    draws = Counter(sequence.shard(k)[0] in urls[:1] for k in range(4000))
    assert abs(draws[True] / 4000 - 0.75) < 0.03
    other_rank = ShardSequence(sources, 0, StreamId(1, 2, 0, 1), resampled=True)
    assert [sequence.shard(k) for k in range(20)] != [other_rank.shard(k) for k in range(20)]


def test_packing_fills_the_cap_at_every_budget_without_padding(builder, tmp_path):
    """Mixed shapes and text lengths: packed steps fill the token cap and pad nothing; steps of one aspect bucket
    with padded text do neither."""
    shapes = [(400, 400), (800, 40), (40, 800), (600, 200), (200, 600), (640, 480)]  # (width, height)
    files = []
    for i in range(48):
        width, height = shapes[i % len(shapes)]
        files += [(f"s{i:02d}.json", record("w" * (3 + (i * 7) % 40), (width, height))), (f"s{i:02d}.0.png", png(width, height))]
    sources = [Source((write_tar(tmp_path / "shapes.tar", files),))]
    for budget in (70, 140):
        figures = {}
        for packing in (True, False):
            schedule = BudgetSchedule((budget,), (1.0,), 0)
            stream = TrainStream(sources, builder, schedule, settings(packing=packing, lookahead=24, batch_tokens=600))
            batches = collect(stream, 0, 1, steps=12)
            fill = sum(batch.tokens for batch in batches) / (600 * len(batches))
            padding = 1 - sum(batch.tokens for batch in batches) / sum(batch.inputs.input_ids.numel() for batch in batches)
            figures[packing] = (fill, padding)
        assert figures[True][0] > 0.9 and figures[True][1] == 0.0, figures
        assert figures[False][0] < figures[True][0] and figures[False][1] > 0.02, figures


def test_matryoshka_batches_hold_the_same_samples_at_every_budget(builder, demo_dir):
    schedule = BudgetSchedule((70, 280), (1.0, 1.0), seed=0, mode="matryoshka")
    batches = next(TrainStream(demo_sources(demo_dir), builder, schedule, settings()).steps(0, 1, 0)).batches
    assert [b.budget for b in batches] == [70, 280]
    assert batches[0].keys == batches[1].keys
    assert batches[0].tokens + batches[1].tokens <= 2400


# ---------------------------------------------------------------- evaluation stream


def test_eval_stream_yields_the_first_samples_in_order_at_one_budget(builder, demo_dir):
    urls = [str(demo_dir / "val-000000.tar")]
    batches = list(EvalStream(urls, builder, budget=140, limit=5, batch_tokens=320, max_batch_size=8))
    keys = [key for b in batches for key in b.keys]
    assert keys == [s.key for s in good_samples(urls)][:5]
    assert {b.budget for b in batches} == {140} and all(b.tokens <= 320 for b in batches)


def test_eval_stream_keeps_only_the_samples_asked_for(builder, demo_dir):
    urls = [str(demo_dir / "val-000000.tar")]
    small = [key for b in EvalStream(urls, builder, 70, 100, 2000, 8, where={"size": "small"}) for key in b.keys]
    expected = [s.key for s in good_samples(urls) if s.record["size"] == "small"]
    assert small == expected and 0 < len(small) < len(good_samples(urls))


def test_eval_stream_skips_bad_samples(builder, tmp_path):
    shard = write_tar(
        tmp_path / "e.tar",
        [
            ("a.json", record("a", (40, 30))),
            ("a.0.png", png(40, 30)),
            ("b.json", record("b", (40, 30))),
            ("b.0.png", b"x"),
            ("c.json", record("c", (40, 30))),
            ("c.0.png", png(40, 30)),
        ],
    )
    stream = EvalStream([shard], builder, budget=70, limit=10, batch_tokens=1120, max_batch_size=2)
    assert [key for batch in stream for key in batch.keys] == ["a", "c"]
    assert stream.skips.counts == {"image": 1}


def test_skip_log_limits_consecutive_failures():
    skips = SkipLog(max_consecutive=3)
    for _ in range(3):
        skips.add("text_too_long", "long")
    skips.read_ok()
    for _ in range(3):
        skips.add("text_too_long", "long")
    with pytest.raises(DataError, match="4 samples in a row were unusable"):
        skips.add("text_too_long", "long")
    assert skips.counts["text_too_long"] == 7


def test_samples_read_fine_whose_images_never_decode_stop_the_stream_too():
    # each sample is read fine (its record admitted), then fails when its image is decoded: a read success
    # must not hide the run of decoding failures (a stream of broken images once spun forever)
    skips = SkipLog(max_consecutive=3)
    for _ in range(3):
        skips.read_ok()
        skips.add("image", "broken bytes", decoding=True)
    skips.read_ok()
    with pytest.raises(DataError, match="4 samples in a row were unusable; last \\(image\\): broken bytes"):
        skips.add("image", "broken bytes", decoding=True)
    skips = SkipLog(max_consecutive=3)
    for _ in range(10):  # decoding failures between decoded samples never stop it
        skips.add("image", "broken bytes", decoding=True)
        skips.decoded_ok()
    assert skips.undecodable == 0 and skips.counts["image"] == 10


def test_demo_samples_are_deterministic_and_record_what_they_show():
    from vlmtrain.data.demo import DEMO_GEOMETRY, PHOTOS, TEXT_SIZES, WORDS, render_sample

    image, record = render_sample(5, seed=3)
    again, same = render_sample(5, seed=3)
    assert record == same and image.tobytes() == again.tobytes()
    samples = [render_sample(index, seed=3) for index in range(16)]
    records = [record for _, record in samples]
    assert {r["photo"] for r in records} <= {name.rsplit(".", 1)[0] for name in PHOTOS}
    assert {r["text"] for r in records} <= set(WORDS) and {r["size"] for r in records} == {"small", "large"}
    for image, record in samples:  # each size looks as large as promised once resized for its budget
        budget, (low, high) = TEXT_SIZES[record["size"]]
        resized_px = record["text_px"] * DEMO_GEOMETRY.image(image.height, image.width, budget).resize[0] / image.height
        assert low - 0.5 <= resized_px <= high + 0.5
    small_at_70 = [
        r["text_px"] * DEMO_GEOMETRY.image(i.height, i.width, 70).resize[0] / i.height for i, r in samples if r["size"] == "small"
    ]
    assert max(small_at_70) < 6  # a grey blur at the lowest budget: the budget matters


def test_demo_set_is_rendered_again_only_when_missing_or_stale(tmp_path, capsys):
    from vlmtrain.cli import main
    from vlmtrain.data.demo import MANIFEST

    def command(train: int) -> list[str]:
        return ["demo-data", "--out", str(tmp_path), "--train", str(train), "--val", "2", "--samples-per-shard", "2"]

    assert main(command(3)) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    shard = tmp_path / "train-000000.tar"
    written = shard.stat().st_mtime_ns
    assert main(command(3)) == 0 and "already holds" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == written
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "renderer": "an older renderer"}))
    assert main(command(1)) == 0  # stale and smaller: rendered again, the old shards gone
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert json.loads((tmp_path / MANIFEST).read_text())["train"] == 1


# ---------------------------------------------------------------- the bucket pool and resuming elsewhere


def test_a_sample_of_a_rare_bucket_waits_at_most_max_wait_steps():
    from vlmtrain.data.buckets import BucketPool, Waiting

    pool = BucketPool(capacity=100, max_wait=5)
    rare = Waiting((0, 0), 0, RawSample("rare", {}), text_tokens=1, arrived=0)
    pool.add(rare)
    taken_at = None
    for step in range(20):
        while len(pool) < 10:  # keep the common bucket fuller than the rare one
            pool.add(Waiting((1, step), 0, RawSample(f"c{step}-{len(pool)}", {}), text_tokens=1, arrived=step))
        chosen = pool.take(
            lambda e: e.sample.key == "rare", lambda e: 10, cap=30, max_size=3, step=step, rng=__import__("random").Random(step)
        )
        if rare in chosen:
            taken_at = step
            break
        assert len(chosen) == 3  # the common bucket fills the cap
    assert taken_at == 5


def test_resuming_with_another_worker_count_keeps_the_step_and_restarts_the_streams(builder, demo_dir, caplog):
    from vlmtrain.budget import BudgetSchedule
    from vlmtrain.data.datamodule import ShardDataModule

    def datamodule(workers: int) -> ShardDataModule:
        data = DataConfig(train=f"{demo_dir}/train-{{000000..000003}}.tar", num_workers=workers)
        return ShardDataModule(data, builder, BudgetSchedule.uniform(seed=3))

    two = datamodule(2)
    steps = list(islice(two.train_dataloader(), 6))
    for step in steps:
        two.record(step)
    state = two.state_dict()
    assert state["world"] == 1 and state["stream_count"] == 2 and state["ranks"][0]["next_step"] == 6

    same = datamodule(2)
    same.load_state_dict(state)
    assert same.next_step == 6 and set(same.streams) == {0, 1}
    one = datamodule(1)
    with caplog.at_level("WARNING", logger="vlmtrain.data.datamodule"):
        one.load_state_dict(state)
    assert one.next_step == 6 and one.streams == {}
    assert "saved with 1 ranks x 2 workers, resuming with 1 x 1" in caplog.text
    resumed = next(iter(one.train_dataloader()))
    assert resumed.index == 6 and resumed.budgets == (UNIFORM.sample(6),)


# ---------------------------------------------------------------- a budget per image


def chat_builder(levels=LEVELS) -> BatchBuilder:
    text = TextEncoder(build_byte_tokenizer(), "<image>")
    return BatchBuilder(Geometry(16, 2, levels), text, TextConfig(max_length=400), DecodingConfig())


@pytest.mark.slow
def test_independent_budgets_give_each_image_its_own_draw_and_keep_fixed_ones(chat_dir):
    builder = chat_builder()
    schedule = BudgetSchedule.uniform(seed=4, per_image="independent")
    sources = [Source(tuple(expand_shards(f"{chat_dir}/train-{{000000..000003}}.tar")))]
    stream = TrainStream(sources, builder, schedule, settings(batch_tokens=6000, lookahead=24))
    steps = list(islice(stream.steps(0, 1, first_step=0), 40))
    by_key = {s.key: s for url in sources[0].urls for s in read_shard(url) if isinstance(s, RawSample)}
    fixed = {key: sample.budgets for key, sample in by_key.items()}
    drawn = Counter()
    mixed = unpinned = 0
    for step in steps:
        (batch,) = step.batches
        assert batch.budget is None and step.budgets == (None,)
        grids = batch.inputs.images.token_grids.tolist()
        images = iter(zip(batch.image_budgets, grids, strict=True))
        sample_of_image = batch.inputs.images.sample_index.tolist()
        for row, key in enumerate(batch.keys):
            count = sample_of_image.count(row)
            mine = [next(images) for _ in range(count)]
            sample = by_key[key]
            for (budget, grid), size, pinned in zip(mine, sample.sizes, fixed[key], strict=True):
                assert list(builder.geometry.image(*size, budget).token_grid) == grid  # each image at its own budget
                assert pinned is None or budget == pinned
                if pinned is None:
                    drawn[budget] += 1
            if all(pinned is None for pinned in fixed[key]):  # pinned budgets would mix a sample's images on their own
                unpinned += 1
                mixed += len({budget for budget, _ in mine}) > 1
        assert sum(int(t) for t in batch.inputs.images.token_counts) + int((batch.inputs.labels != -100).sum()) <= 6000
    assert unpinned > 20 and mixed / unpinned > 0.5  # two images drawn apart: 1 - 5 x (1/5)^2 = 0.8 of the time
    assert set(drawn) == set(LEVELS) and max(drawn.values()) < 3 * min(drawn.values())
    again = [(s.index, s.batches[0].keys, s.batches[0].image_budgets) for s in islice(stream.steps(0, 1, first_step=0), 8)]
    assert again == [(s.index, s.batches[0].keys, s.batches[0].image_budgets) for s in steps[:8]]  # drawn again alike


def test_a_sample_fixing_a_budget_the_model_does_not_train_is_skipped_and_counted(chat_dir):
    builder = chat_builder(levels=(70, 140))
    schedule = BudgetSchedule.uniform((70, 140), seed=4, per_image="independent")
    sources = [Source(tuple(expand_shards(f"{chat_dir}/train-{{000000..000003}}.tar")))]
    steps = list(islice(TrainStream(sources, builder, schedule, settings(batch_tokens=6000, lookahead=24)).steps(0, 1, 0), 10))
    pinned = [s for url in sources[0].urls for s in read_shard(url) if isinstance(s, RawSample) and any(s.budgets)]
    skipped = steps[-1].position.state["skipped"]["budget_not_trained"]
    assert pinned and skipped % len(pinned) == 0 and skipped > 0  # each pinned sample, once per epoch read
    assert not {s.key for s in pinned} & {key for step in steps for key in step.batches[0].keys}
