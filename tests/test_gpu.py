"""bf16 autocast against fp32 for every backbone kind and both poolings, and the flash SDPA kernel for batches
without padding: on a CUDA GPU (tests marked gpu, skipped elsewhere), and the same checks on the CPU, whose
autocast and flash kernel exist too, so that the GPU tests cannot break unseen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import built, image_batch, small_recipe
from lightning.fabric.utilities.apply_func import move_data_to_device
from test_export import BACKBONES
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmtrain.data.samples import RawSample
from vlmtrain.data.sources import read_shard
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.train.run import batch_builder

BF16_LOSS_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa (~0.4 % per operation), a few layers deep
BF16_GRAD_COSINE = 0.98  # the gradient of all trainable weights, as one vector
CASES = [(backbone, pooling) for backbone in sorted(BACKBONES) for pooling in ("average", "attention")]


def model_on(device: str, demo_dir, tmp_path, backbone: str, pooling: str):
    pooling_overrides = (f"model.pooling.kind={pooling}", "model.pooling.heads=2")
    recipe = small_recipe(demo_dir, tmp_path / "run", *BACKBONES[backbone], *pooling_overrides)
    module = built(recipe)
    return module.model.to(device).train(), batch_builder(module.plan)


def check_bf16_close_to_fp32(model: VisionLanguageModel, builder, caption_dir, device: str) -> None:
    samples = [s for url in sorted(map(str, caption_dir.glob("*.tar"))) for s in read_shard(url) if isinstance(s, RawSample)][:6]
    inputs = move_data_to_device(builder.collate([builder.encode(s, 140) for s in samples], 140).inputs, torch.device(device))
    results = {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model.sample_losses(inputs).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results[name] = (float(loss), grads)
    assert results["bf16"][0] == pytest.approx(results["fp32"][0], rel=BF16_LOSS_RTOL)
    assert float(F.cosine_similarity(results["bf16"][1], results["fp32"][1], dim=0)) > BF16_GRAD_COSINE


def check_flash_kernel_runs(model: VisionLanguageModel, device: str) -> None:
    """Three images of one grid (nothing padded) through the backbone with only the flash kernel allowed
    (SDPA raises when it cannot use it)."""
    geometry = model.geometry
    images = move_data_to_device(image_batch(geometry, [(300, 200)] * 3, budget=140), torch.device(device))
    assert images.pixels.shape[0] == int(images.patch_counts.sum())
    backbone = model.backbone.to(torch.bfloat16)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        features = backbone(images.pixels, images.positions, images.patch_grids)
    assert features.shape == (images.pixels.shape[0], backbone.width) and bool(torch.isfinite(features).all())


@pytest.mark.gpu
@pytest.mark.parametrize("backbone, pooling", CASES)
def test_bf16_autocast_forward_and_backward_stay_close_to_fp32_on_gpu(demo_dir, caption_dir, tmp_path, backbone, pooling):
    model, builder = model_on("cuda", demo_dir, tmp_path, backbone, pooling)
    check_bf16_close_to_fp32(model, builder, caption_dir, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_batch_without_padding_runs_on_the_flash_kernel_on_gpu(demo_dir, tmp_path, backbone):
    check_flash_kernel_runs(model_on("cuda", demo_dir, tmp_path, backbone, "average")[0], "cuda")


@pytest.mark.slow
@pytest.mark.parametrize("backbone, pooling", CASES)
def test_bf16_autocast_stays_close_to_fp32_on_cpu(demo_dir, caption_dir, tmp_path, backbone, pooling):
    model, builder = model_on("cpu", demo_dir, tmp_path, backbone, pooling)
    check_bf16_close_to_fp32(model, builder, caption_dir, "cpu")


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_batch_without_padding_runs_on_the_flash_kernel_on_cpu(demo_dir, tmp_path, backbone):
    check_flash_kernel_runs(model_on("cpu", demo_dir, tmp_path, backbone, "average")[0], "cpu")
