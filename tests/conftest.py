"""Shared fixtures: shards written by the tests themselves, and the two-process runs that several test
modules read (helpers shared by the modules live in helpers.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import IMAGES, two_process_run

from vlmtrain.data.annotations import read_annotations
from vlmtrain.data.demo import make_demo_shards
from vlmtrain.data.shards import write_shards

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
    report = write_shards(read_annotations(IMAGES / "captions.jsonl").records, IMAGES, out, "captions", samples_per_shard=4)
    assert not report.rejected
    return out


@pytest.fixture(scope="session")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards: one of images, one of text-only samples. Two ranks always read different ones."""
    out = tmp_path_factory.mktemp("mixed")
    images = [{"key": f"i{i}", "images": [p.name], "text": f"photo {i}"} for i, p in enumerate(sorted(IMAGES.glob("*.jpg")) * 2)]
    texts = [{"key": f"t{i}", "images": [], "text": f"only words {i}"} for i in range(8)]
    write_shards(images, IMAGES, out, "images", samples_per_shard=100)
    write_shards(texts, IMAGES, out, "texts", samples_per_shard=100)
    return out


@pytest.fixture(scope="session")
def zero3_lora_run(demo_dir, mixed_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """DeepSpeed ZeRO-3 + LoRA on two processes: (run directory, its overrides). Read by the distributed,
    adapter, consolidation and export tests."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    return run_dir, two_process_run(demo_dir, mixed_dir, run_dir, "trainer.strategy=deepspeed", "trainer.deepspeed.stage=3")


@pytest.fixture(scope="session")
def fsdp_lora_run(demo_dir, mixed_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """FSDP2 + LoRA on two processes: (run directory, its overrides)."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    return run_dir, two_process_run(demo_dir, mixed_dir, run_dir, "trainer.strategy=fsdp")


@pytest.fixture(scope="session")
def ddp_lora_run(demo_dir, mixed_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """DDP + LoRA on two processes: (run directory, its overrides)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, two_process_run(demo_dir, mixed_dir, run_dir, "trainer.strategy=ddp")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip themselves where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat demo's LLaVA files (24 training, 8 validation conversations) and their shards."""
    from vlmtrain.data.demo_chat import make_chat_set

    out = tmp_path_factory.mktemp("chat")
    for split, path in make_chat_set(out, train=24, val=8).items():
        annotations = read_annotations(path)
        assert not annotations.bad
        write_shards(annotations.records, out / "images", out, split, samples_per_shard=6)
    return out
