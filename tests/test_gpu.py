"""bf16 autocast against fp32 for every backbone kind and both poolings, the flash SDPA kernel for batches
without padding, packed against padded steps in bf16, host-device synchronisations per training step, and
DeepSpeed ZeRO-3 + LoRA in bf16 on one GPU: on a CUDA GPU (tests marked gpu, skipped elsewhere), and the
same checks on the CPU where they mean something there (its autocast, flash kernel and packed attention
exist too), so that the GPU tests cannot break unseen; QLoRA in bf16 (on the CPU: tests/test_export.py).
scripts/gpu_check.sh runs the gpu ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LORA, built, image_batch, run_cli, small_overrides, small_recipe
from lightning.fabric.utilities.apply_func import move_data_to_device
from test_distributed import check_saved_adapter
from test_export import BACKBONES, check_qlora
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmtrain.data.samples import RawSample
from vlmtrain.data.sources import read_shard
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.train.run import batch_builder

BF16_LOSS_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa (~0.4 % per operation), a few layers deep
BF16_GRAD_COSINE = 0.98  # the gradient of all trainable weights, as one vector
MAX_SYNCS_PER_STEP = 48  # host-device synchronisations in one training step (forward, backward, optimizer)
CASES = [(backbone, pooling) for backbone in sorted(BACKBONES) for pooling in ("average", "attention")]


def model_on(device: str, demo_dir, tmp_path, backbone: str, pooling: str):
    pooling_overrides = (f"model.pooling.kind={pooling}", "model.pooling.heads=2")
    recipe = small_recipe(demo_dir, tmp_path / "run", *BACKBONES[backbone], *pooling_overrides)
    module = built(recipe)
    return module.model.to(device).train(), batch_builder(module.plan)


def caption_samples(caption_dir, count: int = 6) -> list[RawSample]:
    return [s for url in sorted(map(str, caption_dir.glob("*.tar"))) for s in read_shard(url) if isinstance(s, RawSample)][:count]


def check_bf16_close_to_fp32(model: VisionLanguageModel, builder, caption_dir, device: str) -> None:
    samples = caption_samples(caption_dir)
    inputs = move_data_to_device(builder.collate([builder.encode(s, 140) for s in samples], 140).inputs, torch.device(device))
    results = {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model.sample_losses(inputs).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results[name] = (float(loss.detach()), grads)
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


def check_sliding_window_attention(device: str) -> None:
    """Packed causal attention with a sliding window (Gemma 4's sliding layers) in bf16 on ``device`` (torch's
    varlen kernel on a GPU, SDPA with a band mask elsewhere) against an fp32 block-diagonal banded mask."""
    from vlmtrain.modeling.attention import Segments

    torch.manual_seed(0)
    lengths, window = [37, 5, 64, 20], 16
    q, k, v = (torch.randn(sum(lengths), heads, 64) for heads in (4, 2, 2))
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    offsets = torch.arange(sum(lengths))[:, None] - torch.arange(sum(lengths))[None, :]
    mask = (sequence[:, None] == sequence[None, :]) & (offsets >= 0) & (offsets < window)
    dense = [x.repeat_interleave(4 // x.shape[1], 1).transpose(0, 1) for x in (q, k, v)]
    expected = F.scaled_dot_product_attention(*dense, attn_mask=mask).transpose(0, 1)
    half = [x.to(device, torch.bfloat16) for x in (q, k, v)]
    got = Segments.of_lengths(lengths, torch.device(device)).attend(*half, causal=True, window=window)
    torch.testing.assert_close(got.float().cpu(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_packed_attention_keeps_a_sliding_window_in_bf16_on_gpu():
    check_sliding_window_attention("cuda")


def test_packed_attention_keeps_a_sliding_window_in_bf16_on_cpu():
    check_sliding_window_attention("cpu")


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


def check_packed_equals_padded_in_bf16(model: VisionLanguageModel, builder, caption_dir, device: str) -> None:
    """Per-sample losses of one packed row and of padded rows, under bf16 autocast (the GPU runs varlen
    flash attention for the packed row, SDPA with a mask for the padded rows)."""
    encoded = [builder.encode(sample, budget) for sample, budget in zip(caption_samples(caption_dir), [70, 140] * 3, strict=True)]
    losses = {}
    for packed in (True, False):
        inputs = move_data_to_device(builder.collate(encoded, None, packed=packed).inputs, torch.device(device))
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            result = model.sample_losses(inputs)
        losses[packed] = (result.loss_sum / result.tokens).float().cpu()
    torch.testing.assert_close(losses[True], losses[False], rtol=BF16_LOSS_RTOL, atol=0.0)


def count_syncs(step) -> int:
    """Host-device synchronisations while ``step()`` runs (CUDA's sync debug mode warns at each one)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


@pytest.mark.gpu
def test_packed_steps_equal_padded_steps_in_bf16_on_gpu(demo_dir, caption_dir, tmp_path):
    model, builder = model_on("cuda", demo_dir, tmp_path, "native", "average")
    check_packed_equals_padded_in_bf16(model, builder, caption_dir, "cuda")


def test_packed_steps_equal_padded_steps_in_bf16_on_cpu(demo_dir, caption_dir, tmp_path):
    model, builder = model_on("cpu", demo_dir, tmp_path, "native", "average")
    check_packed_equals_padded_in_bf16(model, builder, caption_dir, "cpu")


@pytest.mark.gpu
def test_a_training_step_synchronises_host_and_device_a_bounded_number_of_times(demo_dir, caption_dir, tmp_path):
    model, builder = model_on("cuda", demo_dir, tmp_path, "native", "average")
    inputs = move_data_to_device(
        builder.collate([builder.encode(s, 140) for s in caption_samples(caption_dir)], 140).inputs, torch.device("cuda")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.sample_losses(inputs).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation synchronises once
    syncs = count_syncs(step)
    print(f"host-device synchronisations in one training step: {syncs}")
    assert syncs <= MAX_SYNCS_PER_STEP, f"{syncs} synchronisations in one step (bound {MAX_SYNCS_PER_STEP})"


@pytest.mark.gpu
def test_zero3_with_lora_in_bf16_on_one_gpu_trains_saves_and_reloads_the_adapter(demo_dir, tmp_path):
    gpu = ("trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed", "data.val=null")
    zero3 = ("trainer.strategy=deepspeed", "trainer.deepspeed.stage=3")
    overrides = small_overrides(demo_dir, tmp_path / "run", *gpu, *zero3, *LORA, "optim.lm.lr=0.01")
    run_cli(overrides)
    check_saved_adapter(tmp_path / "run", overrides, tmp_path)


@pytest.mark.gpu
def test_qlora_in_bf16_on_one_gpu_trains_and_exports_the_adapter_merged(demo_dir, tmp_path):
    check_qlora(demo_dir, tmp_path, "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed")


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_steps_at_tiny_sizes_on_cpu(tmp_path):
    """scripts/gpu_check.sh --cpu-dry-run: the same script, tests and benchmark code as on the GPU."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch" in (tmp_path / "env.txt").read_text()
    rows = json.loads((tmp_path / "bench_train.json").read_text())
    assert [row["levels"] for row in rows] == [[70], [140], [280], [560], [1120], [70, 140, 280, 560, 1120]]
    for row in rows:
        assert row["step_s"] > 0 and row["tflops_per_step"] > 0 and 0 < row["mfu"] and row["text_tokens_per_s"] > 0
    assert "MFU at 1120" in (tmp_path / "bench_train.txt").read_text()
