"""The video demo: short clips panning over the shipped photos, a large word shown in the first half of each and
another in the second, in LLaMA-Factory's video format (``messages`` with ``<video>`` markers and a ``videos``
list of .mp4 files, H.264 through PyAV). The questions need the frames in order (which word comes first, which
after it) or any frame (which photo it pans over); 70-token frames read the words. ``vlmtrain shards`` turns the
files into shards like any user's video data.

Its detail set (``detail``) asks instead for the small word that one frame of each clip is covered with (as the
image demo writes its small words: legible at 1120 tokens, a blur at 70), in one frame that sampling at 2 a second
would mostly miss; each record fixes that frame as a key frame at 1120 tokens (a ``video_budgets`` column), the
others at the recipe's budget.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmtrain.data.demo import DEMO_GEOMETRY, PHOTOS, TEXT_SIZES, WORDS, demo_font, demo_photo, tile_word
from vlmtrain.data.demo_chat import write_splits

VIDEO_SEED = 11
FRAME_SIZE = (320, 240)  # width, height: even sides (H.264's yuv420p)
FPS = 8


def write_clip(path: Path, frames: list[Image.Image], fps: int = FPS) -> None:
    """``frames`` (RGB, all of one even size) as an H.264 .mp4 at ``fps`` frames a second."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clip(index: int, seed: int, detail: bool = False) -> tuple[list[Image.Image], dict[str, Any]]:
    """Clip ``index``: its frames (a pan across a photo, one word over the first half, another over the second;
    with ``detail``, one of them covered with a small word) and what it shows."""
    rng = random.Random(f"video:{seed}:{index}")
    photo_name = rng.choice(PHOTOS)
    photo = demo_photo(photo_name)
    width, height = FRAME_SIZE
    scale = height / photo.height * rng.uniform(1.0, 1.5)
    wide = photo.resize((max(width + 8, round(photo.width * scale)), max(height, round(photo.height * scale))))
    first, second = rng.sample(WORDS, 2)
    count = rng.randint(3, 6) * FPS
    font = demo_font(rng.randint(44, 60))
    if detail:  # drawn after the clip's other choices: the clips without detail stay as they were
        sign, flash = rng.choice([word for word in WORDS if word not in (first, second)]), rng.randrange(count)
        budget, resized_px = TEXT_SIZES["small"]  # as small as the image demo's small words once at 1120 tokens
        sign_px = round(rng.uniform(*resized_px) * height / DEMO_GEOMETRY.image(height, width, budget).resize[0])
    frames = []
    for number in range(count):
        left = round((wide.width - width) * number / (count - 1))
        frame = wide.crop((left, 0, left + width, height))
        if detail and number == flash:
            tile_word(frame, sign, sign_px, rng)
        word = first if number < count // 2 else second
        draw = ImageDraw.Draw(frame)
        box = draw.textbbox((0, 0), word, font=font)
        at = ((width - box[2]) // 2, (height - box[3]) // 2)
        draw.text(at, word, font=font, fill=(255, 255, 255), stroke_width=3, stroke_fill=(0, 0, 0))
        frames.append(frame)
    shown = {"first": first, "second": second, "photo": photo_name.rsplit(".", 1)[0], "seconds": count / FPS}
    return frames, shown | ({"sign": sign, "sign_time": flash / FPS} if detail else {})


def video_record(index: int, seed: int, video_dir: Path, detail: bool = False) -> dict[str, Any]:
    """Record ``index`` of the video set (its clip written to ``video_dir``), as LLaMA-Factory writes one; of the
    detail set, one question on the sign with its frame a key frame at 1120 tokens."""
    frames, shown = clip(index, seed, detail)
    name = f"{'detail' if detail else 'clip'}{seed}_{index:06d}.mp4"
    write_clip(video_dir / name, frames)
    if detail:
        return {
            "id": f"detail{seed}_{index:06d}",
            "messages": [{"role": "user", "content": "<video>Which small word covers one frame?"},
                         {"role": "assistant", "content": shown["sign"]}],
            "videos": [name], "video_budgets": [{"key_frames": [{"time": shown["sign_time"], "budget": 1120}]}],
        }
    turns = [
        ("user", "<video>Which word appears first?"), ("assistant", shown["first"]),
        ("user", "And which word comes after it?"), ("assistant", shown["second"]),
        ("user", "Which photo does the video pan over?"), ("assistant", shown["photo"]),
    ]
    return {"id": f"video{seed}_{index:06d}", "messages": [{"role": r, "content": c} for r, c in turns], "videos": [name]}


def make_video_set(out_dir: Path, train: int, val: int, seed: int = VIDEO_SEED, detail: bool = False) -> dict[str, Path]:
    """Write ``out_dir/videos/*.mp4`` and the files ``out_dir/train.json`` and ``out_dir/val.json`` (the detail set's
    with ``detail``)."""
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    return write_splits(out_dir, train, val, lambda index: video_record(index, seed, video_dir, detail), "clips")


def mean_levels(frames: list[Image.Image]) -> list[float]:
    """Each frame's mean pixel value (what tests compare decoded frames by)."""
    return [float(np.asarray(frame).mean()) for frame in frames]
