"""Pre-train the demo's native ViT to read: tell the eight demo words apart, written over photos.

A stand-in for a text-aware pretrained encoder (SigLIP2, Gemma 4's tower), which cannot be downloaded
here: a ViT trained from scratch does not learn to read in the few CPU minutes of the demo. Trained on
legible words only — large ones at every budget, small ones at 1120 tokens — on images rendered with
another seed than the demo set, then written where recipes/tiny.yaml reads it. The first half of the
steps uses the budgets up to 280 only: their batches hold many images, which gets the ViT past the long
plateau before it reads at all; batches of 2-4 images at 560-1120 do not. About 8 minutes on 2 CPU cores.

    python scripts/train_reader.py [--steps 1000] [--out data/weights/tiny-reader.safetensors]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vlmtrain.config import load_recipe
from vlmtrain.data.demo import WORDS, render_sample
from vlmtrain.model.description import describe_model
from vlmtrain.modeling.backbone import NativeViT
from vlmtrain.modeling.backbones import BACKBONES
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.inputs import ImageBatch

TRAIN_SEED, VAL_SEED = 11, 12
BATCH_PATCHES, MAX_BATCH = 2560, 32


class Reader(nn.Module):
    """The backbone, its features averaged over each image, and a linear map to the words."""

    def __init__(self, backbone: NativeViT) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.width, len(WORDS))

    def forward(self, images: ImageBatch) -> torch.Tensor:
        features = self.backbone(images.pixels, images.positions, images.patch_grids)
        counts = images.patch_counts
        image = torch.repeat_interleave(torch.arange(images.count), counts)
        return self.head(features.new_zeros(images.count, features.shape[1]).index_add(0, image, features) / counts[:, None])


def image_batch(samples: list, geometry: Geometry, budget: int) -> tuple[ImageBatch, torch.Tensor]:
    """The samples' images at ``budget`` and their word indices (the reader averages patch features, no pooling)."""
    images = ImageBatch.of_images([image for image, _ in samples], budget, geometry, samples=range(len(samples)))
    return images, torch.tensor([WORDS.index(record["text"]) for _, record in samples])


def legible(record: dict, budget: int, levels: tuple[int, ...]) -> bool:
    """Large words are read at every budget, small ones only at the highest."""
    return record["size"] == "large" or budget == levels[-1]


@torch.no_grad()
def accuracy(reader: Reader, samples: list, geometry: Geometry) -> dict[str, dict[int, float]]:
    """Share of words read right, per word size and budget."""
    reader.eval()
    table: dict[str, dict[int, float]] = {}
    for size in ("small", "large"):
        chosen = [s for s in samples if s[1]["size"] == size]
        table[size] = {}
        for budget in geometry.levels:
            right = 0
            for start in range(0, len(chosen), 8):
                images, words = image_batch(chosen[start : start + 8], geometry, budget)
                right += int((reader(images).argmax(-1) == words).sum())
            table[size][budget] = right / len(chosen)
    reader.train()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml", help="the recipe whose native backbone is trained")
    parser.add_argument("--steps", type=int, default=1000, help="the first half at budgets up to 280 only")
    parser.add_argument("--train", type=int, default=1600, help="training images (rendered once)")
    parser.add_argument("--out", type=Path, default=Path("data/weights/tiny-reader.safetensors"))
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, ["model.vision.path=null"])
    description = describe_model(recipe.model, recipe.budget)
    torch.manual_seed(0)
    reader = Reader(BACKBONES[description.vision.kind].build(description.vision.settings))
    geometry = description.geometry()
    levels = geometry.levels
    train = [render_sample(index, TRAIN_SEED) for index in range(args.train)]
    val = [render_sample(index, VAL_SEED) for index in range(128)]
    optimizer = torch.optim.AdamW(reader.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    rng, start, losses = random.Random(0), time.time(), []
    for step in range(1, args.steps + 1):
        budget = rng.choice(levels if step > args.steps // 2 else levels[:3])
        pool = [s for s in train if legible(s[1], budget, levels)]
        batch_size = min(MAX_BATCH, len(pool), max(1, BATCH_PATCHES // (budget * geometry.pool**2)))
        images, words = image_batch(rng.sample(pool, batch_size), geometry, budget)
        loss = nn.functional.cross_entropy(reader(images), words)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step}: loss {sum(losses[-100:]) / 100:.3f} ({time.time() - start:.0f} s)", flush=True)
    table = accuracy(reader, val, geometry)
    print("words read right on 128 held-out images (chance 12.5%)")
    print("size   " + "".join(f"{budget:>7}" for budget in levels))
    for size, row in table.items():
        print(f"{size:<7}" + "".join(f"{row[budget]:>7.0%}" for budget in levels))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in reader.backbone.state_dict().items()}, args.out)
    card = {"recipe": args.recipe, "steps": args.steps, "train_images": args.train, "seconds": round(time.time() - start),
            "val_accuracy": table}
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
