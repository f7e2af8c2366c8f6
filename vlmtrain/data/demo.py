"""The demo task: a word written over a crop of a real photo, in rows like a watermark, large or small;
the target is the word (detail). Each record also names the photo, a coarse target legible at any budget.

Word sizes are set through the geometry: large words stay legible at 70 tokens, small ones only at the
highest budgets, so the per-budget loss shows what the budget buys. Repeating the word over the whole
image, like text on a page, gives every visual token something to read. Deterministic for a seed; writes
images, annotations and shards.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlmtrain.data.shards import ShardReport, write_shards
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.pixels import to_rgb
from vlmtrain.reporting import progress

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
          "camera.png", "brick.png", "coins.png", "china.jpg", "flower.jpg", "grace_hopper.jpg")
WORDS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "leaf")  # distinct first letters
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 1))
LONG_SIDES = (512, 640, 768)
# Font sizes are set by how large a word looks once the image is resized for a budget (with the tiny
# recipe's 16-px tokens): large words look 16-24 px at 70 tokens (64-96 px at 1120), small ones
# 14-20 px at 1120 tokens and 3-5 px at 70, a grey blur.
DEMO_GEOMETRY = Geometry(patch_size=16, pool=1)
TEXT_SIZES = {"large": (70, (16, 24)), "small": (1120, (14, 20))}  # size: (budget, font px after its resize)
MANIFEST = "demo.json"


@cache
def demo_photo(name: str) -> Image.Image:
    """A shipped photo (``data/images``) as RGB, read once."""
    with Image.open(DATA_DIR / "images" / name) as image:
        image.load()
        return to_rgb(image)


@lru_cache(maxsize=64)
def demo_font(size: int) -> ImageFont.FreeTypeFont:
    """The shipped bold font at ``size`` px."""
    return ImageFont.truetype(str(DATA_DIR / "fonts" / "DejaVuSans-Bold.ttf"), size)


def _crop(photo: Image.Image, aspect: tuple[int, int], long_side: int, rng: random.Random) -> Image.Image:
    """A random crop of ``photo`` with aspect ``aspect`` (w:h), resized so its long side is ``long_side``."""
    aspect_w, aspect_h = aspect
    scale = min(photo.width / aspect_w, photo.height / aspect_h) * rng.uniform(0.6, 1.0)
    width, height = max(1, int(aspect_w * scale)), max(1, int(aspect_h * scale))
    left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - height)
    factor = long_side / max(width, height)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return photo.crop((left, top, left + width, top + height)).resize(size, Image.Resampling.BICUBIC)


def tile_word(image: Image.Image, word: str, text_px: int, rng: random.Random) -> None:
    """Write ``word`` over all of ``image`` in staggered rows at ``text_px`` px, white on black or black on white
    (as ``rng`` picks, with where the rows start): how the demo's images show their word."""
    font = demo_font(text_px)
    left, top, right, bottom = font.getbbox(word)
    step_x, step_y = (right - left) * 3 // 2 + 4, (bottom - top) * 9 // 5 + 2
    fill, stroke = rng.choice((((255, 255, 255), (0, 0, 0)), ((0, 0, 0), (255, 255, 255))))
    draw = ImageDraw.Draw(image)
    start_x, start_y = rng.randint(-step_x, 0), rng.randint(-step_y, 0)
    for row, y in enumerate(range(start_y, image.height, step_y)):
        for x in range(start_x + (row % 2) * step_x // 2, image.width, step_x):
            draw.text((x - left, y - top), word, font=font, fill=fill, stroke_width=max(1, text_px // 12), stroke_fill=stroke)


def render_sample(index: int, seed: int, size: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Sample ``index`` of the demo set: the image and its record (word, size class, text height, and the
    photo under the text: a coarse target, legible at any budget). ``size`` forces the size class."""
    rng = random.Random(f"demo:{seed}:{index}")
    photo = rng.choice(PHOTOS)
    image = _crop(demo_photo(photo), rng.choice(ASPECTS), rng.choice(LONG_SIDES), rng)
    word, drawn = rng.choice(WORDS), rng.choice(tuple(TEXT_SIZES))
    size = size or drawn
    budget, resized_px = TEXT_SIZES[size]
    resized_height = DEMO_GEOMETRY.image(image.height, image.width, budget).resize[0]
    text_px = round(rng.uniform(*resized_px) * image.height / resized_height)
    tile_word(image, word, text_px, rng)
    return image, {
        "key": f"demo{seed}_{index:06d}",
        "text": word,
        "size": size,
        "text_px": text_px,
        "photo": photo.rsplit(".", 1)[0],
    }


def demo_manifest(train_samples: int, val_samples: int, seed: int, samples_per_shard: int) -> dict[str, Any]:
    """What a rendered demo set is made from, down to the renderer's source: a set whose manifest differs
    (an older renderer, other sizes) is stale and must be rendered again."""
    renderer = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return {
        "renderer": renderer,
        "train": train_samples,
        "val": val_samples,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
    }


def demo_is_current(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a complete demo set rendered from ``manifest``."""
    path = out_dir / MANIFEST
    return path.is_file() and json.loads(path.read_text()) == manifest


def make_demo_shards(
    out_dir: Path, train_samples: int, val_samples: int, seed: int, samples_per_shard: int
) -> dict[str, ShardReport]:
    """Render the demo set into ``out_dir/images`` and write ``train-*.tar`` and ``val-*.tar`` shards, replacing
    any earlier set there; the manifest is written last, so an interrupted run never looks complete."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    splits = {"train": range(train_samples), "val": range(train_samples, train_samples + val_samples)}
    for stale in (path for split in splits for path in out_dir.glob(f"{split}-*.tar")):
        stale.unlink()
    reports = {}
    for split, indices in splits.items():
        records = []
        for index in progress(indices, f"rendering the demo's {split} images", len(indices)):
            image, record = render_sample(index, seed)
            name = f"{record['key']}.jpg"
            image.save(image_dir / name, quality=92)
            records.append({**record, "images": [name]})
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        reports[split] = write_shards(records, image_dir, out_dir, split, samples_per_shard)
    manifest = demo_manifest(train_samples, val_samples, seed, samples_per_shard)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return reports
