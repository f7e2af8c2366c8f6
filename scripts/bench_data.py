"""Benchmark of the data pipeline against a naive loader, per budget; prints a table.

    python scripts/bench_data.py [--images 400] [--workers 2] [--out /tmp/vlmtrain-bench]

Builds JPEG shards from random crops of the shipped images (long side 256-2048 px, many aspect ratios),
then at each budget, with the same number of DataLoader workers, measures:
- images/s of vlmtrain's TrainStream (buckets, token-capped batches, reduced-scale JPEG decoding);
- images/s of a naive loader: full PIL decode, resize to the geometry, every batch padded to its
  largest image (height and width), the same number of images per batch on average;
- padding (padded visual-token slots / all slots): with buckets, without buckets (one sequence per
  image, padded to the longest), and the naive loader's padding to the largest height x width.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmtrain.budget import BudgetSchedule
from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import BatchingConfig, DataConfig, DecodingConfig, TextConfig
from vlmtrain.data.datamodule import _unbatched
from vlmtrain.data.demo import PHOTOS, demo_photo
from vlmtrain.data.pipeline import TrainStream
from vlmtrain.data.samples import RawSample
from vlmtrain.data.shards import write_shards
from vlmtrain.data.sources import Source, read_shard
from vlmtrain.modeling.geometry import LEVELS, Geometry
from vlmtrain.modeling.tokenizers import build_byte_tokenizer
from vlmtrain.text.encoding import TextEncoder

ASPECTS = [(4, 3), (3, 2), (16, 9), (1, 1), (3, 4), (2, 3), (9, 16), (3, 1), (1, 3), (21, 9)]
GEOMETRY = Geometry(patch_size=16, pool=3)  # Gemma 4's
BATCH_TOKENS = 9216


def build_corpus(out: Path, count: int, seed: int = 0) -> list[str]:
    """JPEG crops of the shipped photos at random sizes and aspect ratios, written as shards of 50."""
    if (out / "bench-index.json").is_file():
        return sorted(str(p) for p in out.glob("bench-*.tar"))
    rng = random.Random(seed)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        photo = demo_photo(rng.choice(PHOTOS))
        aspect_w, aspect_h = rng.choice(ASPECTS)
        scale = min(photo.width / aspect_w, photo.height / aspect_h) * rng.uniform(0.5, 1.0)
        w, h = max(8, int(aspect_w * scale)), max(8, int(aspect_h * scale))
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        long_side = int(math.exp(rng.uniform(math.log(256), math.log(2048))))
        factor = long_side / max(w, h)
        crop = photo.crop((left, top, left + w, top + h)).resize(
            (max(8, round(w * factor)), max(8, round(h * factor))), Image.Resampling.BICUBIC
        )
        crop.save(image_dir / f"{i:05d}.jpg", quality=90)
        records.append({"key": f"b{i:05d}", "images": [f"{i:05d}.jpg"], "text": f"crop {i} of a photo"})
    write_shards(records, image_dir, out, "bench", samples_per_shard=50)
    return sorted(str(p) for p in out.glob("bench-*.tar"))


class NaiveLoader(IterableDataset):
    """Reads samples in order (shards split by worker), decodes each image at full size, resizes it to the
    geometry, pads every batch of ``batch_size`` to its largest height and width; tokenizes the text."""

    def __init__(self, urls: list[str], budget: int, batch_size: int, text: TextEncoder) -> None:
        self.urls, self.budget, self.batch_size, self.text = urls, budget, batch_size, text

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        while True:
            batch = []
            for url in self.urls[worker::workers]:
                for sample in read_shard(url):
                    if not isinstance(sample, RawSample):
                        continue
                    image = Image.open(io.BytesIO(sample.images[0])).convert("RGB")
                    g = GEOMETRY.image(image.height, image.width, self.budget)
                    pixels = torch.from_numpy(np.asarray(image.resize(g.resize[::-1], Image.Resampling.BICUBIC)).copy())
                    ids = self.text.encode("<image>", sample.text("text"), [g.tokens]).input_ids
                    batch.append((pixels, ids))
                    if len(batch) == self.batch_size:
                        yield self.collate(batch)
                        batch = []

    @staticmethod
    def collate(batch):
        height = max(p.shape[0] for p, _ in batch)
        width = max(p.shape[1] for p, _ in batch)
        pixels = torch.zeros(len(batch), height, width, 3, dtype=torch.uint8)
        for i, (p, _) in enumerate(batch):
            pixels[i, : p.shape[0], : p.shape[1]] = p
        tokens = [(p.shape[0] // GEOMETRY.cell) * (p.shape[1] // GEOMETRY.cell) for p, _ in batch]
        slots = len(batch) * (height // GEOMETRY.cell) * (width // GEOMETRY.cell)
        return pixels, [ids for _, ids in batch], sum(tokens), slots


def measure(loader: DataLoader, images: int, count) -> tuple[float, list]:
    """Images per second from the first batch on, until ``images`` images have passed; the batches."""
    iterator = iter(loader)
    first = next(iterator)
    start, seen, batches = time.perf_counter(), 0, [first]
    while seen < images:
        batch = next(iterator)
        batches.append(batch)
        seen += count(batch)
    return seen / (time.perf_counter() - start), batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="images in the corpus")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure", type=int, default=600, help="images timed per loader and budget")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vlmtrain-bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    urls = build_corpus(args.out, args.images)
    text = TextEncoder(build_byte_tokenizer(), "<image>")
    builder = BatchBuilder(
        GEOMETRY, text, TextConfig(prompt="<image>", target_field="text"), DecodingConfig(max_image_pixels=10**8)
    )
    print(
        f"{len(urls)} shards, {args.images} JPEG images (long side 256-2048 px), {args.workers} workers, "
        "geometry patch 16 / pool 3"
    )
    print(
        f"{'budget':>6} {'ours img/s':>11} {'naive img/s':>12} {'speed-up':>9} {'images/batch':>13} "
        f"{'padding: buckets':>17} {'no buckets':>11} {'naive 2-D':>10}"
    )
    rows = []
    for budget in LEVELS:
        schedule = BudgetSchedule((budget,), (1.0,), seed=0)
        results = {}
        for buckets in (True, False):
            batching = BatchingConfig(batch_tokens=BATCH_TOKENS, max_batch_size=256, lookahead=256, max_wait=64, buckets=buckets)
            stream = TrainStream([Source(tuple(urls))], builder, schedule, DataConfig(batching=batching))
            loader = DataLoader(stream, batch_size=None, collate_fn=_unbatched, num_workers=args.workers)
            speed, steps = measure(loader, args.measure, lambda step: step.batches[0].inputs.images.count)
            images = [step.batches[0].inputs.images for step in steps]
            slots = sum(batch.count * int(batch.token_counts.max()) for batch in images)
            padding = 1 - sum(int(batch.token_counts.sum()) for batch in images) / slots
            results[buckets] = (speed, padding, sum(batch.count for batch in images) / len(images))
        per_batch = max(1, round(results[True][2]))
        naive = DataLoader(NaiveLoader(urls, budget, per_batch, text), batch_size=None, num_workers=args.workers)
        naive_speed, naive_batches = measure(naive, args.measure, lambda b: b[0].shape[0])
        naive_padding = 1 - sum(b[2] for b in naive_batches) / sum(b[3] for b in naive_batches)
        row = {
            "budget": budget,
            "ours_images_per_s": results[True][0],
            "naive_images_per_s": naive_speed,
            "speedup": results[True][0] / naive_speed,
            "images_per_batch": results[True][2],
            "padding_buckets": results[True][1],
            "padding_no_buckets": results[False][1],
            "padding_naive": naive_padding,
        }
        rows.append(row)
        print(
            f"{budget:>6} {row['ours_images_per_s']:>11.1f} {row['naive_images_per_s']:>12.1f} {row['speedup']:>8.2f}x "
            f"{row['images_per_batch']:>13.1f} {row['padding_buckets']:>17.1%} {row['padding_no_buckets']:>11.1%} "
            f"{row['padding_naive']:>10.1%}",
            flush=True,
        )
    (args.out / "bench_data.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
