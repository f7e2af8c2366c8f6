"""Helpers shared by the test modules (fixtures live in conftest.py): paths, a shrunken demo recipe, running
the CLI in a subprocess, tiny model configs, and images laid out as the pipeline lays them out."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from runpy import run_path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from vlmtrain.config import Recipe, load_recipe
from vlmtrain.export.format import TextFormat
from vlmtrain.inference import ExportedModel
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.inputs import ImageBatch
from vlmtrain.modeling.pixels import image_patches
from vlmtrain.modeling.tokenizers import build_byte_tokenizer
from vlmtrain.plan import plan_run
from vlmtrain.train.module import VLMModule

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "data" / "images"
TINY = ROOT / "recipes" / "tiny.yaml"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
TWO_PROCESSES = ("trainer.accelerator=cpu", "trainer.devices=2", "data.val=null")
LORA = ("model.lm.lora.rank=4", "model.lm.lora.dropout=0.1", "model.lm.lora.target_modules=[q_proj,v_proj]")

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
TINY_GEMMA4_TEXT = {  # a Gemma 4 text LM: one sliding-window layer (window 8, shorter than a prompt), one global
    "model_type": "gemma4_text",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "global_head_dim": 16,
    "hidden_size_per_layer_input": 0,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 4096,
}
GEMMA4_IMAGE_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>"}
GEMMA4_AUDIO_TOKENS = {"audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}  # its processor needs them
GEMMA4_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "position_embedding_size": 256,
}
QWEN25_TOWER = run_path(str(ROOT / "scripts" / "tiny_qwen.py"))["TOWER"]  # the tiny Qwen2.5-VL tower
SIGLIP2_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_patches": 64}
DINOV2_TOWER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 14, "image_size": 112}


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
        "data.batching.batch_tokens=800",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.log_every=1",
        "trainer.checkpoint_every=2",
        *overrides,
    ]


def two_process_run(demo_dir: Path, mixed_dir: Path, run_dir: Path, *strategy: str) -> list[str]:
    """A 4-step LoRA run on two CPU processes over the mixed shards (one rank reads only text), ``strategy``'s
    overrides last; returns its overrides (the run is in ``run_dir``)."""
    shards = f"data.train={mixed_dir}/images-000000.tar::{mixed_dir}/texts-000000.tar"
    overrides = small_overrides(demo_dir, run_dir, shards, *TWO_PROCESSES, *LORA, "optim.lm.lr=0.01", *strategy)
    run_cli(overrides)
    return overrides


def small_recipe(demo_dir: Path, run_dir: Path, *overrides: str) -> Recipe:
    """The tiny recipe with :func:`small_overrides`."""
    return load_recipe(TINY, small_overrides(demo_dir, run_dir, *overrides))


def built(recipe: Recipe) -> VLMModule:
    """The module of ``recipe`` with its model built, as a fit starts it."""
    module = VLMModule(plan_run(recipe))
    module.configure_model()
    return module


def in_use(module: VLMModule) -> ExportedModel:
    """A training module's model as a model in use (what an export of it would load as)."""
    plan = module.plan
    return ExportedModel(module.model, plan.tokenizer, plan.model, TextFormat.of(plan.recipe.data.text), plan.recipe.data.video)


def run_cli(overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``vlmtrain fit`` of the tiny recipe with ``overrides`` in a subprocess; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", "fit", str(TINY), *overrides],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step, from every launch's CSV metrics."""
    found = {}
    for path in sorted((run_dir / "metrics").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                found[int(row["step"])] = float(row["train/loss"])
    return found


def image_batch(geometry: Geometry, sizes: list[tuple[int, int]], budget: int, seed: int = 0) -> ImageBatch:
    """Random-pixel images of the given (height, width) sizes, laid out as the pipeline does."""
    rng = np.random.default_rng(seed)
    items = []
    for index, (height, width) in enumerate(sizes):
        g = geometry.image(height, width, budget)
        image = Image.fromarray(rng.integers(0, 256, size=(*g.resize, 3), dtype=np.uint8))
        items.append((*image_patches(image, g, geometry.patch_size), g, index))
    return ImageBatch.stack(items, patch_dim=3 * geometry.patch_size**2)


def single(images: ImageBatch, index: int) -> ImageBatch:
    """Image ``index`` alone, as a batch of its own (sample 0)."""
    alone = images.select([index])
    alone.sample_index = torch.zeros_like(alone.sample_index)
    return alone


def image_rows(images: ImageBatch, index: int) -> slice:
    """Where image ``index``'s patches are in the packed batch."""
    offsets = [0, *torch.cumsum(images.patch_counts, 0).tolist()]
    return slice(offsets[index], offsets[index + 1])


def save_as_full_checkpoint(model: torch.nn.Module, folder: Path, model_type: str, prefix: str, vision_config: dict) -> None:
    """Write ``model`` as the vision tower inside a whole VLM checkpoint (config + prefixed safetensors)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vision_config": vision_config, "text_config": {}}))
    tensors = {prefix + name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(folder / "model.safetensors"))


def gemma4_tokenizer(folder: Path) -> Path:
    """A tokenizer folder (the byte tokenizer) that declares Gemma 4's image, begin- and end-of-image tokens
    (and its audio ones) as Gemma 4's tokenizer does, so that its processor can expand images; it has Gemma 4's
    video token too."""
    tokenizer = build_byte_tokenizer(GEMMA4_IMAGE_TOKENS["image_token"])
    named = {**GEMMA4_IMAGE_TOKENS, **GEMMA4_AUDIO_TOKENS}
    others = [token for name, token in named.items() if name != "image_token"] + ["<|video|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": others}, replace_extra_special_tokens=False)
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **named}))
    return folder


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes that mention ``text`` (a run directory, a pipe: command): what a
    run left behind."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if text in line and process.info["pid"] != os.getpid():
            found.append(line)
    return found


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> str:
    """A tar file holding ``files`` (name, bytes) as they are: a shard the pipeline reads."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def record(text: str | None, *sizes: tuple[int, int]) -> bytes:
    """A shard record with a text field and images of these (width, height)."""
    values = {"images": [{"name": f"{i}.png", "width": w, "height": h} for i, (w, h) in enumerate(sizes)]}
    if text is not None:
        values["text"] = text
    return json.dumps(values).encode()


def random_images(geometry, budget: int, sizes: list[tuple[int, int]], seed: int) -> list:
    """Random images already at the size ``geometry`` gives them at ``budget`` (no resize path resamples them)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    images = []
    for height, width in sizes:
        rows, cols = geometry.image(height, width, budget).resize
        images.append(Image.fromarray(torch.randint(0, 256, (rows, cols, 3), generator=generator, dtype=torch.uint8).numpy()))
    return images


def losses_and_grads(model, inputs) -> tuple:
    """The per-sample losses of ``inputs`` and the gradients of their mean (every parameter that got one)."""
    model.zero_grad()
    losses = model.sample_losses(inputs)
    losses.mean().backward()
    return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
