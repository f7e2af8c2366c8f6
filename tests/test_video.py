"""Video: records with videos convert (their files stored unchanged, with their facts), train as frames sampled at
the recipe's rate (each an image at the video's budget, after its ``mm:ss`` timestamp), decode to the frames at
their times, and a broken video is one line at conversion and a counted skip in training."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import write_tar
from PIL import Image

from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import DecodingConfig, TextConfig, VideoConfig
from vlmtrain.data.demo_video import FPS, make_video_set, mean_levels, write_clip
from vlmtrain.data.samples import RawSample, SampleError
from vlmtrain.data.sources import read_shard
from vlmtrain.data.video import decode_frames, probe_video
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.prompt import FrameLayout
from vlmtrain.modeling.tokenizers import IGNORE_INDEX, build_byte_tokenizer
from vlmtrain.text.encoding import TextEncoder


@pytest.fixture(scope="module")
def video_set(tmp_path_factory) -> Path:
    """The video demo's files (4 train clips, 1 val) converted by ``vlmtrain shards`` as a user would."""
    folder = tmp_path_factory.mktemp("videos")
    make_video_set(folder, 4, 1)
    for split in ("train", "val"):
        command = [sys.executable, "-m", "vlmtrain.cli", "shards", str(folder / f"{split}.json"), str(folder / "shards"),
                   "--images", str(folder / "videos"), "--prefix", split]
        subprocess.run(command, check=True, capture_output=True, text=True)
    return folder


def shards_of(lines: list[dict], folder: Path, media: Path) -> subprocess.CompletedProcess:
    """``vlmtrain shards --skip-bad`` of ``lines`` (written as ``folder/a.jsonl``, their files under ``media``)
    into ``folder/out``, as a user runs it; it must exit 0."""
    (folder / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = [sys.executable, "-m", "vlmtrain.cli", "shards", str(folder / "a.jsonl"), str(folder / "out"),
               "--images", str(media), "--skip-bad"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


CLIPS = [(90, 30.0), (7, 30.0), (300, 25.0), (61, 30.0), (5, 2.0), (1, 30.0), (33, 8.0), (1000, 29.97)]  # (frames, rate)


@pytest.mark.parametrize(("total", "rate"), CLIPS)
def test_the_frames_sampled_are_those_each_familys_video_processor_samples(total, rate):
    """2 frames a second, at most 16, at least one unit: the indices transformers' own samplers give for the
    settings the native exports write (Qwen3-VL's video processor; Gemma 4's, transformers' default sampler,
    given the rate, or the frame count for a video longer than max_frames / fps)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    def metadata() -> VideoMetadata:
        return VideoMetadata(total_num_frames=total, fps=rate, duration=total / rate)

    qwen3 = Qwen3VLVideoProcessor(fps=2.0, min_frames=2, max_frames=16).sample_frames(metadata())
    assert FrameLayout(frames=2, sampling="linspace").frame_indices(total, rate, 2.0, 16) == qwen3.tolist()
    longer = total / rate * 2.0 > 16
    gemma4 = default_sample_indices_fn(metadata(), **({"num_frames": 16} if longer else {"fps": 2.0}))
    assert FrameLayout().frame_indices(total, rate, 2.0, 16) == gemma4.tolist()


def test_qwen2_5_vl_frames_are_those_its_video_processor_samples():
    # Qwen2VLVideoProcessor (it needs torchvision: worked out from its sample_frames for fps 2, min_frames 2,
    # max_frames 16): a whole number of temporal patches, total / count apart from 0, rounded down
    stride = FrameLayout(frames=2, sampling="stride")
    assert stride.frame_indices(90, 30.0, 2.0, 16) == [0, 15, 30, 45, 60, 75]
    assert stride.frame_indices(7, 30.0, 2.0, 16) == [0, 3]  # shorter than a second: one temporal patch
    assert stride.frame_indices(300, 25.0, 2.0, 16) == [0, 18, 37, 56, 75, 93, 112, 131, 150, 168, 187, 206, 225, 243, 262, 281]
    assert stride.frame_indices(61, 30.0, 2.0, 16) == [0, 15, 30, 45]
    assert stride.frame_indices(5, 2.0, 2.0, 16) == [0, 1, 2, 3]  # 5 frames: the odd one out is left


def test_a_cap_on_a_videos_tokens_takes_fewer_frames():
    assert VideoConfig(max_frames=16, max_tokens=600).frames(70) == 8 and VideoConfig(max_tokens=100).frames(140) == 1
    # Qwen3-VL's two frames share their tokens: the cap allows twice the frames, max_frames still bounds them
    assert VideoConfig(max_frames=16, max_tokens=300).frames(70, 2) == 8 and VideoConfig(max_tokens=600).frames(70, 2) == 16


def test_the_decoded_frames_are_the_clips_frames_at_their_times(tmp_path):
    # a clip whose frame n is grey level 10 n: each decoded frame is the first frame at or after its time (within
    # half a frame), at the size asked; a seek (past SEEK_AHEAD) and decoding on both land there
    frames = [Image.new("RGB", (64, 48), (10 * n,) * 3) for n in range(24)]
    write_clip(tmp_path / "grey.mp4", frames, fps=8)
    data = (tmp_path / "grey.mp4").read_bytes()
    facts = probe_video(data)
    assert {k: facts[k] for k in ("width", "height", "fps", "frames", "duration", "audio")} == {
        "width": 64, "height": 48, "fps": 8.0, "frames": 24, "duration": 3.0, "audio": False
    }
    times = [0.0, 0.3, 0.5, 2.9]
    decoded = decode_frames(data, times, [(24, 32)] * 4)
    assert [frame.size for frame in decoded] == [(32, 24)] * 4
    expected = [10 * math.ceil(time * 8 - 0.5) for time in times]  # frame n shows from n / 8 s
    assert all(abs(found - level) < 4 for found, level in zip(mean_levels(decoded), expected, strict=True)), mean_levels(decoded)


def test_videos_are_stored_unchanged_with_their_facts(video_set):
    records = json.loads((video_set / "train.json").read_text())
    with tarfile.open(video_set / "shards" / "train-000000.tar") as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    for entry in records:
        stored = json.loads(members[f"{entry['id']}.json"])
        assert members[f"{entry['id']}.v0.mp4"] == (video_set / "videos" / entry["videos"][0]).read_bytes()
        (video,) = stored["videos"]
        assert (video["name"], video["width"], video["height"], video["fps"], video["audio"]) == ("v0.mp4", 320, 240, FPS, False)
        assert video["duration"] == video["frames"] / FPS and video["frames"] in (24, 32, 40, 48)
        assert stored["messages"][0]["content"][0] == {"type": "video"}


def test_a_video_trains_as_timestamped_frames_at_its_budget_and_labels_stay_on_the_answers(video_set):
    tokenizer = build_byte_tokenizer()  # with its own chat template: an assistant turn ends with <eos>
    geometry = Geometry(16, 1)
    builder = BatchBuilder(geometry, TextEncoder(tokenizer, "<image>"), TextConfig(max_length=512), DecodingConfig())
    video = VideoConfig(fps=2.0, max_frames=5, budget=140)
    records = {record["id"]: record for record in json.loads((video_set / "train.json").read_text())}
    for sample in read_shard(str(video_set / "shards" / "train-000000.tar"), video):
        assert isinstance(sample, RawSample)
        record = records[sample.key]
        assert len(sample.images) == 5 and sample.budgets == [140] * 5  # every clip is 3-6 s: 2 frames a second, at most 5
        stamps = [part["text"] for part in sample.messages[0]["content"] if part["type"] == "text"][:5]
        seconds = [int(60 * int(stamp.split(":")[0]) + int(stamp.split(":")[1])) for stamp in stamps]
        assert stamps[0] == "00:00 " and all(stamp.startswith(" 00:0") for stamp in stamps[1:]) and seconds == sorted(seconds)
        encoded = builder.encode(sample, sample.budgets)
        tokens = geometry.image(240, 320, 140).tokens
        assert [geometry.tokens for *_, geometry in encoded.images] == [tokens] * 5 and tokens <= 140
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        assert encoded.text.input_ids.count(image_id) == 5 * tokens
        pairs = zip(encoded.text.input_ids, encoded.text.labels, strict=True)
        labelled = [token for token, label in pairs if label != IGNORE_INDEX]
        answers = [turn["content"] for turn in record["messages"] if turn["role"] == "assistant"]
        assert tokenizer.decode(labelled, skip_special_tokens=False) == "".join(f"{answer}<eos>" for answer in answers)


def test_a_missing_or_broken_video_is_one_line_at_conversion_and_a_counted_skip_in_training(video_set, tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    good = json.loads((video_set / "train.json").read_text())[0]
    (tmp_path / "videos" / good["videos"][0]).write_bytes((video_set / "videos" / good["videos"][0]).read_bytes())
    answer = {"role": "assistant", "content": "x"}
    lines = [
        good,
        {"messages": [{"role": "user", "content": "<video>What?"}, answer], "videos": ["gone.mp4"]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "broken.mp4"}]}, answer]},
    ]
    result = shards_of(lines, tmp_path, tmp_path / "videos")
    assert f"left out {tmp_path / 'a.jsonl'}:2: video '{tmp_path / 'videos' / 'gone.mp4'}' not found" in result.stdout
    assert "rejected 000000002: video 'broken.mp4': cannot read the video: " in result.stdout
    assert "wrote 1 samples in 1 shards" in result.stdout

    # a shard whose video breaks off after its headers: the sample is read, then skipped when its frames decode
    with tarfile.open(video_set / "shards" / "train-000000.tar") as tar:
        members = [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()][:2]
    (name, record), (video_name, data) = sorted(members)
    cut = write_tar(tmp_path / "cut.tar", [(name, record), (video_name, data[: len(data) * 2 // 3])])
    (sample,) = read_shard(cut)
    text = TextEncoder(build_byte_tokenizer(), "<image>")
    builder = BatchBuilder(Geometry(16, 1), text, TextConfig(max_length=512), DecodingConfig())
    with pytest.raises(SampleError, match=rf"sample {sample.key!r}: cannot .* the video") as caught:
        builder.encode(sample, sample.budgets)
    assert caught.value.kind == "video"


def test_a_model_in_use_answers_a_video_as_training_saw_it(demo_dir, video_set, tmp_path):
    """The same conversation and video: the logits of a model in use (frames sampled and decoded as in training,
    each at the video budget after its timestamp) equal training's on the prompt, through an export too."""
    from helpers import built, in_use, small_recipe

    from vlmtrain.export.format import TextFormat
    from vlmtrain.export.run import TrainedModel
    from vlmtrain.export.write import write_export
    from vlmtrain.inference import load
    from vlmtrain.train.run import batch_builder

    video = ("data.video.fps=1.5", "data.video.max_frames=3", "data.video.budget=140", "data.text.max_length=512")
    recipe = small_recipe(demo_dir, tmp_path / "run", *video)
    module = built(recipe)
    builder = batch_builder(module.plan)
    sample = next(iter(read_shard(str(video_set / "shards" / "train-000000.tar"), recipe.data.video)))
    record = next(r for r in json.loads((video_set / "train.json").read_text()) if r["id"] == sample.key)
    batch = builder.collate([builder.encode(sample, sample.budgets)], None, packed=False)
    with torch.no_grad():
        trained = module.model.eval()(batch.inputs)
    question = [record["messages"][0]]  # the first user turn: "<video>Which word appears first?"
    path = video_set / "videos" / record["videos"][0]
    text_format = TextFormat.of(recipe.data.text)
    write_export(TrainedModel(module.model, module.plan.tokenizer, module.plan.model, text_format, recipe, tmp_path),
                 recipe, tmp_path / "export")
    for model in (in_use(module), load(tmp_path / "export")):
        assert model.video == recipe.data.video
        ids, images = model.inputs([], messages=question, videos=[path])
        assert images.token_counts.tolist() == [geometry.tokens for *_, geometry in builder.encode(sample, sample.budgets).images]
        assert ids[0].tolist() == batch.inputs.input_ids[0, : ids.shape[1]].tolist()
        torch.testing.assert_close(model.logits([], messages=question, videos=[path]), trained[:, : ids.shape[1]])
    assert isinstance(model.generate([], messages=question, videos=[path.read_bytes()], max_new_tokens=4), str)


def test_each_video_draws_one_budget_for_all_its_frames_per_step_and_a_fixed_one_wins():
    from vlmtrain.budget import BudgetSchedule
    from vlmtrain.data.video import frame_budgets, with_frames

    facts = {"width": 64, "height": 48, "duration": 2.0, "fps": 8.0, "frames": 16}
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "video"}, {"type": "video"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]
    videos = [(b"a", facts), (b"b", facts), (b"c", {**facts, "budget": 1120})]
    config = VideoConfig(fps=2.0, levels=[70, 280], weights=[1.0, 1.0])
    sample = with_frames(RawSample("k", {"messages": messages}, [b"img"], [(48, 64)], budgets=[560], videos=videos), config)
    assert sample.frame_of == [0] * 4 + [None] + [1] * 4 + [2] * 4
    assert sample.budgets == [None] * 4 + [560] + [None] * 4 + [1120] * 4  # drawn, the image's, drawn, the record's
    schedule = BudgetSchedule.uniform(seed=3)
    draws = [frame_budgets(sample, config, schedule, step) for step in range(400)]
    assert draws[7] == frame_budgets(sample, config, BudgetSchedule.uniform(seed=3), 7)  # pure: any process agrees
    for drawn in draws:
        assert len(set(drawn[:4])) == 1 and len(set(drawn[5:9])) == 1 and drawn[4] == 560 and drawn[9:] == [1120] * 4
    differ = sum(drawn[0] != drawn[5] for drawn in draws) / len(draws)  # two videos differ in 1 - sum(w^2) = 1/2 of steps
    over_steps = {drawn[0] for drawn in draws}
    assert 0.4 < differ < 0.6 and over_steps == {70, 280}


def grey_frames(folder: Path, count: int) -> list[str]:
    """``count`` JPEG frames, frame n a flat grey of level 20 n, written under ``folder``: their names."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        Image.new("RGB", (64, 48), (20 * n,) * 3).save(folder / f"f{n}.jpg", quality=95)
    return [f"f{n}.jpg" for n in range(count)]


@pytest.mark.slow
def test_a_video_given_as_frame_images_is_stored_frame_by_frame_and_trains_as_frames_fps_apart(tmp_path):
    from helpers import built, in_use, small_recipe

    from vlmtrain.data.demo import make_demo_shards
    from vlmtrain.train.run import batch_builder

    names = grey_frames(tmp_path / "frames", 5)
    answer = {"role": "assistant", "content": "grey"}
    lines = [  # LLaMA-Factory's nested list, a TRL/qwen-vl-utils video part, and a frame given as if it were a video file
        {"messages": [{"role": "user", "content": "<video>Which grey?"}, answer], "videos": [names]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": names}, {"type": "text", "text": "Which grey?"}]},
                      answer]},
        {"messages": [{"role": "user", "content": "<video>Which grey?"}, answer], "videos": names[:1]},
    ]
    result = shards_of(lines, tmp_path, tmp_path / "frames")
    assert "wrote 2 samples in 1 shards" in result.stdout
    assert "rejected 000000002: video 'f0.jpg': " in result.stdout
    assert "(an image: a video given as frames is a list of image paths, one list per video)" in result.stdout
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    for key in ("000000000", "000000001"):
        (video,) = json.loads(members[f"{key}.json"])["videos"]
        assert video == {"frames": 5, "images": [{"name": f"v0.{n}.jpg", "width": 64, "height": 48} for n in range(5)]}
        assert [members[f"{key}.v0.{n}.jpg"] for n in range(5)] == [(tmp_path / "frames" / name).read_bytes() for name in names]

    # taken 2 a second (data.video.fps), at most 3 of them spread as transformers' default sampler spreads them
    # (frame i x 5 // 3): frames 0, 1 and 3, at 0, 0.5 and 1.5 s (00:00, 00:00, 00:01)
    demo = tmp_path / "demo"
    make_demo_shards(demo, train_samples=4, val_samples=2, seed=1, samples_per_shard=4)
    video = ("data.video.fps=2", "data.video.max_frames=3", "data.video.budget=70", "data.text.max_length=512")
    module = built(small_recipe(demo, tmp_path / "run", *video))
    builder = batch_builder(module.plan)
    for sample in read_shard(str(tmp_path / "out" / "shard-000000.tar"), module.recipe.data.video):
        assert sample.images == [members[f"{sample.key}.v0.{n}.jpg"] for n in (0, 1, 3)] and sample.budgets == [70] * 3
        stamps = [part["text"] for part in sample.messages[0]["content"] if part["type"] == "text"][:3]
        assert stamps == ["00:00 ", " 00:00 ", " 00:01 "]
    batch = builder.collate([builder.encode(sample, sample.budgets)], None, packed=False)
    images = batch.inputs.images
    means = [float(pixels.float().mean()) for pixels in images.pixels.split(images.patch_counts.tolist())]
    assert all(abs(found - level) < 3 for found, level in zip(means, (0, 20, 60), strict=True)), means

    # a model in use given the frames (images, or their files) as one video: training's ids, token counts and logits
    question = [{"role": "user", "content": "<video>Which grey?"}]
    with torch.no_grad():
        trained = module.model.eval()(batch.inputs)
    model = in_use(module)
    frames = [Image.open(tmp_path / "frames" / name) for name in names]
    for given in (frames, [tmp_path / "frames" / name for name in names]):
        ids, images = model.inputs([], messages=question, videos=[given])
        assert images.token_counts.tolist() == batch.inputs.images.token_counts.tolist()
        assert ids[0].tolist() == batch.inputs.input_ids[0, : ids.shape[1]].tolist()
        torch.testing.assert_close(model.logits([], messages=question, videos=[given]), trained[:, : ids.shape[1]])


def test_the_detail_sets_clips_show_their_sign_in_the_one_frame_their_record_fixes_as_a_key_frame(tmp_path):
    from vlmtrain.data.demo_video import clip, video_record

    plain, shown = clip(3, 11)
    frames, detail = clip(3, 11, detail=True)
    differ = [number for number, (a, b) in enumerate(zip(plain, frames, strict=True)) if a.tobytes() != b.tobytes()]
    assert differ == [round(detail["sign_time"] * FPS)] and shown == {k: v for k, v in detail.items() if not k.startswith("sign")}
    record = video_record(3, 11, tmp_path, detail=True)
    assert record["video_budgets"] == [{"key_frames": [{"time": detail["sign_time"], "budget": 1120}]}]
    assert record["messages"][1]["content"] == detail["sign"] not in (detail["first"], detail["second"])


@pytest.mark.slow
def test_a_key_frame_a_record_fixes_trains_in_place_of_the_nearest_sampled_frame_at_its_budget(demo_dir, tmp_path):
    """A video part's (or a ``video_budgets`` column's) ``budget`` and ``key_frames`` are stored with the video; the
    key frame trains in place of the sampled frame nearest it, at its budget, the others at the video's; a model in
    use given the same part does the same. A key frame past the end, a qwen-vl-utils sampling key or a level
    that is none are one line each."""
    from helpers import built, in_use, small_recipe

    from vlmtrain.data.images import decode_image
    from vlmtrain.data.video import decoded_images
    from vlmtrain.train.run import batch_builder

    (tmp_path / "videos").mkdir()
    write_clip(tmp_path / "videos" / "grey.mp4", [Image.new("RGB", (64, 48), (10 * n,) * 3) for n in range(24)], fps=8)
    key = {"time": 1.1, "budget": 1120}  # frame round(1.1 x 8) = 9, nearest sampled frame 8 (of 0, 4, 8, ... at 2 a second)
    part = {"type": "video", "video": "grey.mp4", "budget": 70, "key_frames": [key]}
    answer = {"role": "assistant", "content": "grey"}

    def asked(**fixed: object) -> dict:
        return {"messages": [{"role": "user", "content": "<video>Which grey?"}, answer], "videos": ["grey.mp4"], **fixed}

    lines = [
        {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Which grey?"}]}, answer]},
        asked(video_budgets=[{"key_frames": [key]}]),  # LLaMA-Factory-style: a column beside 'videos', no video budget
        asked(video_budgets=[{"key_frames": [{"time": 3.5, "budget": 1120}]}]),
        {"messages": [{"role": "user", "content": [{**part, "fps": 4.0}]}, answer]},
        asked(video_budgets=[{"key_frames": [{"time": 1, "budget": 1000}]}]),
    ]
    result = shards_of(lines, tmp_path, tmp_path / "videos")
    assert "wrote 2 samples in 1 shards" in result.stdout
    assert "rejected 000000002: video 1: a key frame at 3.5 s, past its end (3.00 s)" in result.stdout
    assert f"{tmp_path / 'a.jsonl'}:4: turn 1: a video part's 'fps': vlmtrain sizes images and frames" in result.stdout
    assert f"{tmp_path / 'a.jsonl'}:5: video 1: a key frame's: budget 1000 is not one of 70, 140" in result.stdout

    video = ("data.video.fps=2", "data.video.levels=[70]", "data.text.max_length=512", "data.batching.batch_tokens=4096",
             "budget.levels=[70,1120]", "budget.default=1120")  # the model's default budget 1120, its frames' 70
    recipe = small_recipe(demo_dir, tmp_path / "run", *video)
    module = built(recipe)
    geometry = module.plan.geometry
    tokens = {budget: geometry.image(48, 64, budget).tokens for budget in (70, 1120)}
    expected = [tokens[70]] * 2 + [tokens[1120]] + [tokens[70]] * 3
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        stored = [json.load(tar.extractfile(member)) for member in tar.getmembers() if member.name.endswith(".json")]
    videos = [video for entry in stored for video in entry["videos"]]
    assert [{name: video[name] for name in ("budget", "key_frames") if name in video} for video in videos] == [
        {"budget": 70, "key_frames": [key]}, {"key_frames": [key]}]
    framed_samples = read_shard(str(tmp_path / "out" / "shard-000000.tar"), recipe.data.video)
    for framed, video_budget in zip(framed_samples, (70, None), strict=True):
        assert framed.budgets == [video_budget] * 2 + [1120] + [video_budget] * 3  # None: drawn from data.video.levels
        stamps = [part["text"] for part in framed.messages[0]["content"] if part["type"] == "text"][:6]
        assert stamps == ["00:00 ", " 00:00 ", " 00:01 ", " 00:01 ", " 00:02 ", " 00:02 "]  # 0, 0.5, 1.125, 1.5, 2, 2.5 s
        sizes = [geometry.image(h, w, budget or 70).resize for (h, w), budget in zip(framed.sizes, framed.budgets, strict=True)]
        decoded = decoded_images(framed.images, sizes, lambda data, _: decode_image(data))
        found = mean_levels(decoded)
        assert all(abs(a - b) < 4 for a, b in zip(found, [0, 40, 90, 120, 160, 200], strict=True)), found  # frames 0, 4, 9, ...

    builder_sample = next(iter(read_shard(str(tmp_path / "out" / "shard-000000.tar"), recipe.data.video, module.plan.frames)))
    builder = batch_builder(module.plan)
    encoded = builder.encode(builder_sample, builder_sample.budgets)
    assert [geometry.tokens for *_, geometry in encoded.images] == expected
    ids, images = in_use(module).inputs([], messages=[lines[0]["messages"][0]], videos=[tmp_path / "videos" / "grey.mp4"])
    assert images.token_counts.tolist() == expected
    assert ids[0].tolist() == builder.collate([encoded], None, packed=False).inputs.input_ids[0, : ids.shape[1]].tolist()

    # vlmtrain eval at the records' budgets: the key frame at 1120, the other frames at their video's budget, or
    # (drawn in training) at the video budget, not the model's default (a fixed budget puts the key frame, sampled
    # all the same, at that budget)
    from vlmtrain.evaluate import evaluate
    from vlmtrain.export.format import TextFormat
    from vlmtrain.export.run import TrainedModel
    from vlmtrain.export.write import write_export

    text_format = TextFormat.of(recipe.data.text)
    write_export(TrainedModel(module.model, module.plan.tokenizer, module.plan.model, text_format, recipe, tmp_path), recipe,
                 tmp_path / "export")
    results = evaluate([tmp_path / "export"], str(tmp_path / "out" / "shard-000000.tar"), ["record", 70], 2,
                       tmp_path / "eval", generate=False)
    rows = {row["budget"]: row for row in results["models"][0]["budgets"]}
    assert rows["record"]["visual_tokens_per_image"] == pytest.approx(sum(expected) / 6)
    assert rows["record"]["visual_tokens_per_sample"] == sum(expected)  # per video: each sample is one
    assert rows[70]["visual_tokens_per_image"] == tokens[70] and rows[70]["images"] == rows["record"]["images"] == 12
