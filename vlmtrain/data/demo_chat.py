"""The chat demo: multi-turn, multi-image conversations in LLaVA JSON, built from the demo renderer's images
(words written over the shipped photos).

Most conversations show two images: the first with a small word, which needs a high budget to be read,
the second with a large word, which 70 tokens show well, and ask about both over several turns; some show
one image, a few none. A quarter of the records fix their images' budgets (1120 for the small word, 70 for
the large one), the rest leave them to the recipe's schedule. ``vlmtrain shards`` turns the files into
shards like any user's LLaVA data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtrain.data.demo import WORDS, render_sample
from vlmtrain.reporting import progress

CHAT_SEED = 7  # other renders than the demo set and the reader's training images


def conversation(index: int, seed: int, image_dir: Path) -> dict[str, Any]:
    """Record ``index`` of the chat set (its images written to ``image_dir``)."""
    rng = random.Random(f"chat:{seed}:{index}")
    kind = rng.choices(("pair", "small", "large", "text"), weights=(6, 2, 1, 1))[0]
    if kind == "text":
        word = rng.choice(WORDS)
        turns = [("human", f"Spell the word {word}."), ("gpt", " ".join(word))]
        return {"id": f"chat{seed}_{index:06d}", "conversations": [{"from": f, "value": v} for f, v in turns]}
    sizes = {"pair": ("small", "large"), "small": ("small",), "large": ("large",)}[kind]
    images, records = [], []
    for position, size in enumerate(sizes):
        image, record = render_sample(index * 2 + position, seed, size=size)
        name = f"{record['key']}.jpg"
        image.save(image_dir / name, quality=92)
        images.append(name)
        records.append(record)
    if kind == "pair":
        small, large = records
        turns = [
            ("human", "<image>\n<image>\nWhat is the small word on the first image?"),
            ("gpt", small["text"]),
            ("human", "And the large word on the second image?"),
            ("gpt", large["text"]),
            ("human", "Which photo is under the second image?"),
            ("gpt", large["photo"]),
        ]
    else:
        (record,) = records
        turns = [("human", f"<image>\nWhat is the {record['size']} word here?"), ("gpt", record["text"])]
    entry: dict[str, Any] = {
        "id": f"chat{seed}_{index:06d}",
        "image": images,
        "conversations": [{"from": f, "value": v} for f, v in turns],
    }
    if rng.random() < 0.25:
        entry["budgets"] = [1120 if size == "small" else 70 for size in sizes]
    return entry


def make_chat_set(out_dir: Path, train: int, val: int, seed: int = CHAT_SEED) -> dict[str, Path]:
    """Write ``out_dir/images/*.jpg`` and the LLaVA files ``out_dir/train.json`` and ``out_dir/val.json``."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    return write_splits(out_dir, train, val, lambda index: conversation(index, seed, image_dir), "conversations")


def write_splits(out_dir: Path, train: int, val: int, record: Callable[[int], dict[str, Any]], what: str) -> dict[str, Path]:
    """``out_dir/train.json`` (records ``0 .. train - 1`` of a demo set, as ``record`` makes them) and
    ``out_dir/val.json`` (the next ``val``), as JSON arrays; their paths by split."""
    files = {}
    for split, indices in {"train": range(train), "val": range(train, train + val)}.items():
        files[split] = out_dir / f"{split}.json"
        records = [record(index) for index in progress(indices, f"rendering the {split} {what}", len(indices))]
        files[split].write_text(json.dumps(records, indent=1) + "\n")
    return files
