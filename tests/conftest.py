"""Shared fixtures: shards written by the tests themselves, and a very small recipe for CPU runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vlmtrain.config import Recipe, load_recipe
from vlmtrain.data.demo import make_demo_shards
from vlmtrain.data.shards import read_annotations, write_shards

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "data" / "images"

torch.set_num_threads(2)
logging.getLogger("vlmtrain").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training samples in 4 shards and 8 validation samples in 1, rendered like the demo."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_shards(out, train_samples=24, val_samples=8, seed=1, samples_per_shard=6)
    return out


@pytest.fixture(scope="session")
def caption_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped real images with their captions (one two-image and one text-only sample) in 4 shards."""
    out = tmp_path_factory.mktemp("captions")
    report = write_shards(read_annotations(IMAGES / "captions.jsonl"), IMAGES, out, "captions", samples_per_shard=4)
    assert not report.rejected
    return out


TINY = ROOT / "recipes" / "tiny.yaml"


def small_overrides(demo_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    """Overrides that shrink the tiny recipe to seconds of CPU: a 1-layer ViT and LM of width 32, budgets 70 and 140."""
    return [
        f"run_dir={run_dir}",
        "logger=csv",
        "model.vision.path=null",
        "model.vision.width=32",
        "model.vision.depth=1",
        "model.vision.heads=2",
        "model.lm.hf_config.hidden_size=32",
        "model.lm.hf_config.intermediate_size=64",
        "model.lm.hf_config.num_hidden_layers=1",
        "model.lm.hf_config.num_attention_heads=2",
        "model.lm.hf_config.num_key_value_heads=2",
        "budget.levels=[70,140]",
        "budget.default=70",
        f"data.train={demo_dir}/train-{{000000..000003}}.tar",
        f"data.val={demo_dir}/val-000000.tar",
        "data.val_samples=4",
        "data.num_workers=0",
        "data.batch_tokens=800",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.log_every=1",
        "trainer.checkpoint_every=2",
        *overrides,
    ]


def small_recipe(demo_dir: Path, run_dir: Path, *overrides: str) -> Recipe:
    """The tiny recipe with :func:`small_overrides`."""
    return load_recipe(TINY, small_overrides(demo_dir, run_dir, *overrides))
