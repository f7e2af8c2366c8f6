"""Video figures, measured in one run (issue 29): the loader's frames/s (seek to each sampled frame and scale it as
it becomes RGB, :func:`vlmtrain.data.video.decode_frames`) against a naive decode (every frame at full size to RGB,
then the sampled ones resized), on a generated clip; and, per frame budget, the visual tokens of one video and the
step time of the demo model on a batch of video samples (forward and backward).

    python scripts/bench_video.py [--seconds 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtrain.data.demo import DATA_DIR
from vlmtrain.data.demo_video import write_clip
from vlmtrain.data.video import decode_frames, probe_video
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.prompt import FRAMES_AS_IMAGES


def long_clip(seconds: int, fps: int = 30, size: tuple[int, int] = (640, 360)) -> bytes:
    """A clip panning slowly over a shipped photo, with a little noise in each frame (H.264, the encoder's default
    key frame interval), as bytes."""
    width, height = size
    photo = Image.open(DATA_DIR / "images" / "astronaut.png").convert("RGB")
    photo = photo.resize((width * 2, round(photo.height * width * 2 / photo.width)))
    noise = np.random.default_rng(0)
    frames = []
    count = seconds * fps
    for number in range(count):
        left = round(width * number / count)
        pixels = np.asarray(photo.crop((left, 0, left + width, height)), dtype=np.int16)
        pixels = np.clip(pixels + noise.integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8)
        frames.append(Image.fromarray(pixels))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        write_clip(path, frames, fps)
        return path.read_bytes()


def naive_frames(data: bytes, times: list[float], sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """Every frame decoded to RGB at full size, the ones at ``times`` resized: what a loader without seeking does."""
    import av

    wanted, chosen = list(times), []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(container.streams.video[0]):
            image = frame.to_image()
            while wanted and frame.time + 1 / 60 >= wanted[0]:
                height, width = sizes[len(chosen)]
                chosen.append(image.resize((width, height), Image.Resampling.BICUBIC))
                wanted.pop(0)
    return chosen


def loader_figures(seconds: int, repeats: int) -> None:
    data = long_clip(seconds)
    facts = probe_video(data)
    geometry = Geometry(16, 1)
    print(f"clip: {facts['width']}x{facts['height']}, {facts['duration']:.0f} s at {facts['fps']:.0f} fps, H.264, "
          f"{len(data) / 1e6:.1f} MB")
    print("| frames sampled | budget | seek + scaled decode, frames/s | full decode + resize, frames/s | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for fps, max_frames, budget in ((2.0, 16, 70), (2.0, 16, 280), (0.5, 8, 1120)):
        times = [index / facts["fps"] for index in FRAMES_AS_IMAGES.frame_indices(facts["frames"], facts["fps"], fps, max_frames)]
        size = geometry.image(facts["height"], facts["width"], budget).resize
        timings = {}
        for name, decode in (("seek", decode_frames), ("naive", naive_frames)):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                frames = decode(data, times, [size] * len(times))
                best = min(best, time.perf_counter() - start)
            assert len(frames) == len(times)
            timings[name] = len(times) / best
        print(f"| {len(times)} | {budget} | {timings['seek']:.1f} | {timings['naive']:.1f} | "
              f"{timings['seek'] / timings['naive']:.1f}x |")


def step_figures(repeats: int) -> None:
    import torch

    from vlmtrain.config import load_recipe
    from vlmtrain.data.annotations import read_annotations
    from vlmtrain.data.config import VideoConfig
    from vlmtrain.data.demo_video import make_video_set
    from vlmtrain.data.shards import write_shards
    from vlmtrain.data.sources import read_shard
    from vlmtrain.plan import plan_run
    from vlmtrain.train.module import VLMModule
    from vlmtrain.train.run import batch_builder

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        files = make_video_set(root, 4, 1)
        write_shards(read_annotations(files["train"]).records, root / "videos", root / "shards", "train", 64)
        recipe = load_recipe(Path("recipes/video-tiny.yaml"), [f"data.train={root}/shards/train-000000.tar", "data.val=null",
                                                               "logger=none", f"run_dir={root}/run"])
        module = VLMModule(plan_run(recipe))
        module.configure_model()
        builder = batch_builder(module.plan)
        print("\n| frame budget | frames / video | visual tokens / video | step (4 videos, fwd+bwd) |")
        print("| ---: | ---: | ---: | ---: |")
        for budget in (70, 140, 280, 560):
            video = VideoConfig(fps=2.0, max_frames=8, budget=budget)
            samples = list(read_shard(str(root / "shards" / "train-000000.tar"), video))
            encoded = [builder.encode(sample, sample.budgets) for sample in samples]
            batch = builder.collate(encoded, None)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                module.model.zero_grad()
                module.model.sample_losses(batch.inputs).mean().backward()
                best = min(best, time.perf_counter() - start)
            tokens = sum(sum(geometry.tokens for *_, geometry in sample.images) for sample in encoded) / len(encoded)
            frames = sum(len(sample.images) for sample in encoded) / len(encoded)
            print(f"| {budget} | {frames:.0f} | {tokens:.0f} | {best * 1000:.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loader_figures(args.seconds, args.repeats)
    step_figures(args.repeats)


if __name__ == "__main__":
    main()
