"""The model: backbones, pooling, projector and the splice into the LM, checked against direct computations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    GEMMA4_TOWER,
    QWEN25_TOWER,
    SIGLIP2_TOWER,
    TINY,
    TINY_GEMMA4_TEXT,
    TINY_LLAMA,
    image_batch,
    image_rows,
    losses_and_grads,
    random_images,
    save_as_full_checkpoint,
    single,
)
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model, Gemma4VisionConfig, Gemma4VisionModel, Siglip2VisionConfig, Siglip2VisionModel

from vlmtrain.budget import BudgetConfig
from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.config import DecodingConfig, TextConfig
from vlmtrain.data.samples import RawSample
from vlmtrain.data.sources import read_shard
from vlmtrain.errors import UserError
from vlmtrain.families import build_model
from vlmtrain.model.config import LMConfig, LoraConfig, ModelConfig, PoolingConfig, VisionConfig
from vlmtrain.model.description import Start, describe_model
from vlmtrain.model.lm import build_lm, lm_tokenizer, save_adapter_folder
from vlmtrain.model.pretrained import pretrained_backbone
from vlmtrain.modeling.backbone import NativeViT, aspect_class
from vlmtrain.modeling.backbones import BACKBONES, TOWERS, TowerKind
from vlmtrain.modeling.geometry import LEVELS, Geometry
from vlmtrain.modeling.inputs import ImageBatch, ModelInput
from vlmtrain.modeling.pooling import AttentionPooling, AveragePooling, GeometryMismatch, gather_windows
from vlmtrain.modeling.tokenizers import IGNORE_INDEX, build_byte_tokenizer
from vlmtrain.text.encoding import TextEncoder


def load_tower(kind: str, path: str | None, hf_config: dict) -> torch.nn.Module:
    """The registry's backbone ``kind`` as a recipe with this path and hf_config would build it."""
    vision = VisionConfig(backbone=kind, path=path, hf_config=hf_config, patch_size=None)
    settings = BACKBONES[kind].settings(vision)
    return BACKBONES[kind].build(settings) if path is None else pretrained_backbone(kind, settings, path)


@pytest.mark.parametrize("stem", ["conv", "linear"])
def test_native_vit_gives_each_packed_image_what_it_gives_the_image_alone(stem):
    torch.manual_seed(0)
    geometry = Geometry(patch_size=8, pool=2)
    vit = NativeViT(patch_size=8, width=32, depth=2, heads=2, stem=stem).eval()
    images = image_batch(geometry, [(40, 90), (100, 30), (64, 64), (40, 90)], budget=70)  # two share a grid
    packed = vit(images.pixels, images.positions, images.patch_grids)
    assert packed.shape == (images.pixels.shape[0], 32)
    for index in range(4):
        alone = single(images, index)
        expected = vit(alone.pixels, alone.positions, alone.patch_grids)
        torch.testing.assert_close(packed[image_rows(images, index)], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("causal", "kv_heads", "window"), [(False, 4, None), (True, 4, None), (True, 2, None), (True, 2, 3)])
def test_packed_attention_equals_a_block_diagonal_mask(causal: bool, kv_heads: int, window: int | None):
    from vlmtrain.modeling.attention import Segments

    lengths = [6, 5, 6, 4, 1, 6]
    q = torch.randn(sum(lengths), 4, 8)
    k, v = (torch.randn(sum(lengths), kv_heads, 8) for _ in range(2))
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = sequence[:, None] == sequence[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    if window is not None:  # each query sees itself and the two keys before it
        mask &= ~torch.ones_like(mask).tril(-window)
    repeat = 4 // kv_heads
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(repeat, 1).transpose(0, 1),
        v.repeat_interleave(repeat, 1).transpose(0, 1),
        attn_mask=mask,
    ).transpose(0, 1)
    got = Segments.of_lengths(lengths, q.device).attend(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_conv_stem_sees_the_image_as_a_whole():
    torch.manual_seed(0)
    geometry = Geometry(patch_size=4, pool=1)
    vit = NativeViT(patch_size=4, width=16, depth=1, heads=2, stem="conv")
    images = image_batch(geometry, [(12, 20)], budget=70)
    g = geometry.image(12, 20, 70)
    rows, cols = g.patch_grid
    canvas = images.pixels.float().view(rows, cols, 4, 4, 3).permute(4, 0, 2, 1, 3).reshape(1, 3, rows * 4, cols * 4) / 127.5 - 1
    expected = vit.stem.norm(vit.stem.convs(canvas).permute(0, 2, 3, 1).reshape(rows * cols, 16))
    torch.testing.assert_close(vit.stem(images.pixels, images.positions, images.patch_grids), expected)


def token_slices(images: ImageBatch) -> list[slice]:
    offsets = [0, *torch.cumsum(images.token_counts, 0).tolist()]
    return [slice(offsets[i], offsets[i + 1]) for i in range(images.count)]


def test_gather_and_average_pooling_match_per_image_pooling():
    geometry = Geometry(patch_size=4, pool=3)
    images = image_batch(geometry, [(30, 80), (90, 40), (10, 10)], budget=140)
    features = torch.randn(images.pixels.shape[0], 8)
    pooled = AveragePooling(3)(features, images.positions, images.token_grids)
    windows = gather_windows(features, images.positions, images.token_grids, 3)
    assert pooled.shape[0] == windows.shape[0] == int(images.token_counts.sum())
    for index, tokens in enumerate(token_slices(images)):
        rows, cols = images.token_grids[index].tolist()
        grid = features[image_rows(images, index)].view(rows * 3, cols * 3, 8)
        expected = F.avg_pool2d(grid.permute(2, 0, 1)[None], 3)[0].permute(1, 2, 0).reshape(rows * cols, 8)
        torch.testing.assert_close(pooled[tokens], expected)
        first = grid[:3, :3].reshape(9, 8)  # the image's first token's window, in (y, x) order
        torch.testing.assert_close(windows[tokens.start], first)


def test_attention_pooling_starts_as_average_pooling_and_learns():
    geometry = Geometry(patch_size=4, pool=2)
    images = image_batch(geometry, [(30, 50), (50, 20)], budget=70)
    features = torch.randn(images.pixels.shape[0], 16, requires_grad=True)
    attention = AttentionPooling(2, width=16, heads=4)
    average = AveragePooling(2)(features, images.positions, images.token_grids)
    pooled = attention(features, images.positions, images.token_grids)
    torch.testing.assert_close(pooled, average)
    (pooled**2).sum().backward()
    assert attention.attention.out_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("break_it", ["grid", "position", "duplicate"])
def test_pooling_refuses_patches_that_do_not_fill_the_promised_grid(break_it):
    geometry = Geometry(patch_size=4, pool=2)
    images = image_batch(geometry, [(30, 50), (20, 20)], budget=70)
    features = torch.randn(images.pixels.shape[0], 8)
    grids, positions = images.token_grids.clone(), images.positions.clone()
    if break_it == "grid":
        grids[0, 1] += 1
    elif break_it == "position":
        positions[3, 0] = 999
    else:
        positions[3] = positions[2]
    with pytest.raises(GeometryMismatch):
        AveragePooling(2)(features, positions, grids)


def gemma4_inputs(images: ImageBatch, geometry: Geometry, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What Gemma4ImageProcessor gives for the same images: [0, 1] pixels padded to max_patches, -1 positions."""
    longest = geometry.max_patches(budget)
    pixels = torch.zeros(images.count, longest, images.pixels.shape[1])
    positions = torch.full((images.count, longest, 2), -1, dtype=torch.long)
    for index in range(images.count):
        rows = image_rows(images, index)
        count = rows.stop - rows.start
        pixels[index, :count] = images.pixels[rows].float() / 255.0
        positions[index, :count] = images.positions[rows]
    return pixels, positions


@pytest.mark.slow
def test_qwen2_5_vl_tower_gives_qwens_own_image_features_at_every_budget(tmp_path):
    """The tower read from a whole Qwen2.5-VL checkpoint (weights under model.visual.) gives, for one and two
    images at every budget, exactly what Qwen2_5_VLModel's visual gives on its own processor's pixels."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 300, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    whole = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_TOWER)).eval()
    whole.save_pretrained(tmp_path / "qwen")
    kind = BACKBONES["qwen2_5_vl"]
    vision = VisionConfig(backbone="qwen2_5_vl", path=str(tmp_path / "qwen"), patch_size=None)
    settings = kind.settings(vision)
    backbone = pretrained_backbone("qwen2_5_vl", settings, vision.path).eval()
    geometry = kind.geometry(settings, 2, LEVELS)
    assert (geometry.patch_size, geometry.pool, geometry.rule, geometry.min_pixels) == (14, 2, "smart_resize", 3136)
    for budget in LEVELS:
        for count in (1, 2):
            images = random_images(geometry, budget, [(300, 451), (900, 420)][:count], seed=budget)
            batch = ImageBatch.of_images(images, budget, geometry)
            processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": budget * 28 * 28})
            served = processor(images=images, return_tensors="pt")
            assert served["image_grid_thw"][:, 1:].tolist() == batch.patch_grids.tolist()
            with torch.no_grad():
                ours = backbone(batch.pixels, batch.positions, batch.patch_grids)
                theirs = whole.model.visual(served["pixel_values"], grid_thw=served["image_grid_thw"]).pooler_output
            assert ours.shape[0] == int(batch.token_counts.sum())
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_tower_that_pools_itself_takes_the_tower_pooling_and_no_projector():
    from vlmtrain.config import RecipeError, load_recipe

    tower = ["model.vision.backbone=qwen2_5_vl", f"model.vision.hf_config={json.dumps(QWEN25_TOWER)}",
             "model.vision.patch_size=null"]
    with pytest.raises(RecipeError, match="the qwen2_5_vl encoder pools and projects itself: set model.pooling.kind: tower"):
        load_recipe(TINY, tower)
    only = r"model.pooling.kind: tower: only for an encoder that pools itself \(qwen2_5_vl, qwen3_vl\)"
    with pytest.raises(RecipeError, match=only):
        load_recipe(TINY, ["model.pooling.kind=tower"])


def test_gemma4_backbone_with_average_pooling_equals_gemma4_vision_model(tmp_path):
    torch.manual_seed(0)
    config = Gemma4VisionConfig(**GEMMA4_TOWER, standardize=True)
    reference = Gemma4VisionModel(config).eval()
    reference.std_bias.normal_()
    reference.std_scale.uniform_(0.5, 1.5)
    reference.save_pretrained(tmp_path)
    backbone = load_tower("gemma4", str(tmp_path), {}).eval()
    settings = BACKBONES["gemma4"].settings(VisionConfig(backbone="gemma4", path=str(tmp_path), patch_size=None))
    assert (backbone.patch_size, backbone.width, BACKBONES["gemma4"].own_pool(settings)) == (16, 32, 3)
    geometry = Geometry(patch_size=16, pool=3)
    images = image_batch(geometry, [(100, 300), (250, 120)], budget=70)
    with torch.no_grad():
        expected = reference(*gemma4_inputs(images, geometry, 70)).last_hidden_state
        features = backbone(images.pixels, images.positions, images.patch_grids)
        tokens = AveragePooling(3)(features, images.positions, images.token_grids)
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)


def test_gemma4_tower_loads_from_a_whole_gemma4_checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = Gemma4VisionModel(Gemma4VisionConfig(**GEMMA4_TOWER)).eval()
    save_as_full_checkpoint(
        reference, tmp_path / "gemma4", "gemma4", "model.vision_tower.", {**GEMMA4_TOWER, "model_type": "gemma4_vision"}
    )
    loaded = load_tower("gemma4", str(tmp_path / "gemma4"), {}).model.eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_checkpoint_without_the_tower_is_a_clear_error(tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4", "vision_config": GEMMA4_TOWER}))
    save_file({"model.language_model.embed_tokens.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="no weights under model.vision_tower."):
        load_tower("gemma4", str(folder), {})


def test_siglip2_backbone_loads_from_a_whole_siglip2_checkpoint_and_ignores_padding(tmp_path):
    torch.manual_seed(0)
    reference = Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_TOWER, vision_use_head=False)).eval()
    save_as_full_checkpoint(
        reference, tmp_path / "siglip2", "siglip2", "vision_model.", {**SIGLIP2_TOWER, "model_type": "siglip2_vision_model"}
    )
    backbone = load_tower("siglip2", str(tmp_path / "siglip2"), {}).eval()
    geometry = Geometry(patch_size=16, pool=2)
    images = image_batch(geometry, [(120, 300), (300, 100)], budget=70)
    grids = images.patch_grids
    with torch.no_grad():
        packed = backbone(images.pixels, images.positions, grids)
        for index in range(2):
            alone = single(images, index)
            expected = reference(
                pixel_values=alone.pixels[None].float() / 127.5 - 1,
                pixel_attention_mask=torch.ones(1, alone.pixels.shape[0]),
                spatial_shapes=grids[index : index + 1],
            ).last_hidden_state[0]
            torch.testing.assert_close(packed[image_rows(images, index)], expected, atol=1e-5, rtol=1e-4)


def test_dinov2_backbone_equals_dinov2_on_each_image_alone(tmp_path):
    torch.manual_seed(0)
    reference = Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=112)
    ).eval()
    reference.save_pretrained(tmp_path)
    backbone = load_tower("dinov2", str(tmp_path), {}).eval()
    assert (backbone.patch_size, backbone.width) == (14, 32)
    geometry = Geometry(patch_size=14, pool=2)
    images = image_batch(geometry, [(100, 300), (300, 100), (110, 290)], budget=70)  # two share a grid
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        packed = backbone(images.pixels, images.positions, images.patch_grids)
        for index in range(3):
            rows, cols = images.patch_grids[index].tolist()
            pixels = images.pixels[image_rows(images, index)].float()
            canvas = pixels.view(rows, cols, 14, 14, 3).permute(4, 0, 2, 1, 3).reshape(3, rows * 14, cols * 14) / 255
            expected = reference(pixel_values=((canvas - mean) / std)[None]).last_hidden_state[0, 1:]
            torch.testing.assert_close(packed[image_rows(images, index)], expected, atol=1e-5, rtol=1e-4)


def test_lm_from_a_local_folder_gets_an_image_token_and_room_for_it(tmp_path):
    tokenizer = build_byte_tokenizer(image_token="<img>")
    lm = build_lm(LMConfig(hf_config=TINY_LLAMA), tokenizer)
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded_tokenizer = lm_tokenizer(LMConfig(path=str(tmp_path)))
    loaded = build_lm(LMConfig(path=str(tmp_path)), loaded_tokenizer)
    assert "<image>" in loaded_tokenizer.get_vocab() and len(loaded_tokenizer) == len(tokenizer) + 1
    assert loaded.get_input_embeddings().num_embeddings >= len(loaded_tokenizer)
    with pytest.raises(FileNotFoundError, match="only local paths"):
        build_lm(LMConfig(path=str(tmp_path / "missing")), loaded_tokenizer)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = ModelConfig(
        vision=VisionConfig(patch_size=16, width=32, depth=1, heads=2),
        pooling=PoolingConfig(kind="average", size=2),
        lm=LMConfig(hf_config=TINY_LLAMA),
    )
    tokenizer = lm_tokenizer(config.lm)
    model = build_model(describe_model(config, BudgetConfig()), Start.of(config), tokenizer)
    fields = TextConfig(prompt="Look: <image> says", target_field="text", max_length=96)
    return model, BatchBuilder(model.geometry, TextEncoder(tokenizer, "<image>"), fields, DecodingConfig())


@pytest.fixture(scope="module")
def real_samples(caption_dir):
    return [s for url in sorted(map(str, caption_dir.glob("*.tar"))) for s in read_shard(url) if isinstance(s, RawSample)]


def expected_visual_tokens(model, images: ImageBatch, index: int) -> torch.Tensor:
    """Image ``index`` encoded alone, pooled on its own grid with avg_pool2d, row-major: what its placeholders must hold."""
    alone = single(images, index)
    pool = model.geometry.pool
    rows, cols = alone.token_grids[0].tolist()
    features = model.backbone(alone.pixels, alone.positions, alone.patch_grids)
    grid = features.view(rows * pool, cols * pool, -1).permute(2, 0, 1)[None]
    return model.projector(F.avg_pool2d(grid, pool)[0].permute(1, 2, 0).reshape(rows * cols, -1))


@pytest.mark.parametrize("budget", [70, 140, 280])
def test_each_image_fills_exactly_its_own_placeholders_in_order(tiny_model, real_samples, budget):
    model, builder = tiny_model
    batch = builder.collate([builder.encode(s, budget) for s in real_samples], budget, packed=False).inputs
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.images)[0]
        placeholders = batch.input_ids == model.image_token_id
        for row in range(batch.size):
            images = torch.nonzero(batch.images.sample_index == row).squeeze(1).tolist()
            expected = [expected_visual_tokens(model, batch.images, i) for i in images]
            assert int(placeholders[row].sum()) == sum(e.shape[0] for e in expected)
            if expected:
                torch.testing.assert_close(embeds[row][placeholders[row]], torch.cat(expected), atol=1e-5, rtol=1e-4)
    text = ~placeholders
    torch.testing.assert_close(embeds[text], model.lm.get_input_embeddings()(batch.input_ids)[text])


def test_a_placeholder_mismatch_is_refused(tiny_model, real_samples):
    model, builder = tiny_model
    batch = builder.collate([builder.encode(s, 70) for s in real_samples[:2]], 70, packed=False).inputs
    first = int(torch.nonzero(batch.input_ids[0] == model.image_token_id)[0, 0])
    batch.input_ids[0, first] = builder.text.tokenizer.convert_tokens_to_ids("a")
    with pytest.raises(GeometryMismatch, match="image placeholders per sample"):
        model.embed(batch.input_ids, batch.images)


def test_text_only_batches_still_run_and_reach_every_vision_parameter(tiny_model, real_samples):
    model, builder = tiny_model
    text_only = [s for s in real_samples if not s.images]
    batch = builder.collate([builder.encode(s, 70) for s in text_only], 70, packed=False).inputs
    assert batch.images.count == 0
    model.zero_grad()
    model.sample_losses(batch).mean().backward()
    for name in ("vision", "projector"):
        grads = [p.grad for p in model.parts()[name].parameters()]
        assert grads and all(g is not None and not g.any() for g in grads), name


def test_a_mixed_batch_gives_a_text_only_sample_no_visual_tokens(tiny_model, real_samples):
    model, builder = tiny_model
    chosen = [s for s in real_samples if s.key in ("no_image", "pair", "logo2")]
    batch = builder.collate([builder.encode(s, 70) for s in chosen], 70, packed=False).inputs
    row = [s.key for s in chosen].index("no_image")
    assert row not in batch.images.sample_index.tolist() and batch.images.count == 3
    assert not (batch.input_ids[row] == model.image_token_id).any()
    with torch.no_grad():
        losses = model.sample_losses(batch)
        alone = model.sample_losses(builder.collate([builder.encode(chosen[row], 70)], 70, packed=False).inputs)
    torch.testing.assert_close(losses.loss_sum[row], alone.loss_sum[0], atol=1e-4, rtol=1e-4)


def test_losses_from_trimmed_logits_equal_full_cross_entropy(tiny_model, real_samples):
    model, builder = tiny_model
    batch = builder.collate([builder.encode(s, 70) for s in real_samples[:4]], 70, packed=False).inputs
    with torch.no_grad():
        losses = model.sample_losses(batch)
        logits = model(batch)
    targets = batch.labels[:, 1:]
    full = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(losses.loss_sum, full.sum(1), atol=1e-4, rtol=1e-5)
    assert losses.tokens.tolist() == (targets != IGNORE_INDEX).sum(1).tolist()


def test_native_backbone_starts_from_weights_in_a_safetensors_file(tmp_path):
    native = BACKBONES["native"]
    settings = native.settings(VisionConfig(backbone="native", patch_size=16, width=64, depth=1, heads=4))
    torch.manual_seed(5)
    source = native.build(settings)
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    torch.manual_seed(6)
    loaded = pretrained_backbone("native", settings, str(tmp_path / "vit.safetensors"))
    images = image_batch(Geometry(16, 1), [(40, 70)], 70)
    with torch.no_grad():
        expected = source(images.pixels, images.positions, images.patch_grids)
        assert torch.equal(loaded(images.pixels, images.positions, images.patch_grids), expected)
    with pytest.raises(ValueError, match="does not fit the recipe's native backbone: .*check width"):
        pretrained_backbone("native", {**settings, "width": 128}, str(tmp_path / "vit.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.vision.path"):
        pretrained_backbone("native", settings, str(tmp_path / "missing.safetensors"))


def test_the_shipped_reader_weights_fit_the_demo_recipe():
    from vlmtrain.config import load_recipe

    root = Path(__file__).resolve().parents[1]
    model = load_recipe(root / "recipes" / "tiny.yaml").model
    backbone = pretrained_backbone("native", describe_model(model, BudgetConfig()).vision.settings, str(root / model.vision.path))
    assert torch.equal(backbone.stem.norm.weight, load_file(root / model.vision.path)["stem.norm.weight"])


def test_the_registry_holds_the_native_vit_and_every_tower():
    assert set(BACKBONES) == {"native", *TOWERS}
    assert all(isinstance(BACKBONES[name], TowerKind) and BACKBONES[name].spec is TOWERS[name] for name in TOWERS)


def test_a_tower_description_holds_its_config_and_a_pool_size_from_the_tower(tmp_path):
    reference = Gemma4VisionModel(Gemma4VisionConfig(**GEMMA4_TOWER, pooling_kernel_size=2))
    reference.save_pretrained(tmp_path)
    model = ModelConfig(
        vision=VisionConfig(backbone="gemma4", path=str(tmp_path), patch_size=None), pooling=PoolingConfig(size=None)
    )
    description = describe_model(model, BudgetConfig(levels=[70, 140]))
    assert description.vision.settings["hidden_size"] == 32 and description.vision.settings["pooling_kernel_size"] == 2
    assert "model_type" not in description.vision.settings and "transformers_version" not in description.vision.settings
    assert (description.pooling.size, description.geometry().pool, description.geometry().patch_size) == (2, 2, 16)
    assert description.default_budget == 140  # 280 is not trained: the level nearest to it
    with pytest.raises(UserError, match="model.vision.patch_size: 14, but the gemma4 tower uses 16"):
        describe_model(ModelConfig(vision=VisionConfig(backbone="gemma4", path=str(tmp_path), patch_size=14)), BudgetConfig())


def test_one_sample_trains_one_image_at_1120_and_the_other_at_70_in_one_pass(chat_dir):
    """Forward and backward through a two-image conversation with its images at 1120 and 70 tokens: each
    image fills exactly its own placeholders with its own visual tokens, and the encoder gets gradients."""
    vision = VisionConfig(patch_size=16, width=32, depth=1, heads=2)
    config = ModelConfig(vision=vision, pooling=PoolingConfig(size=1), lm=LMConfig(hf_config=TINY_LLAMA))
    tokenizer = lm_tokenizer(config.lm)
    torch.manual_seed(0)
    model = build_model(describe_model(config, BudgetConfig()), Start.of(config), tokenizer)
    builder = BatchBuilder(model.geometry, TextEncoder(tokenizer, "<image>"), TextConfig(max_length=400), DecodingConfig())
    sample = next(
        s
        for url in sorted(map(str, chat_dir.glob("train-*.tar")))
        for s in read_shard(url)
        if isinstance(s, RawSample) and len(s.sizes) == 2
    )
    batch = builder.collate([builder.encode(sample, (1120, 70))], None, packed=False)
    assert batch.image_budgets == [1120, 70]
    expected = [model.geometry.image(h, w, b).tokens for (h, w), b in zip(sample.sizes, (1120, 70), strict=True)]
    assert batch.inputs.images.token_counts.tolist() == expected and expected[0] > 1000 >= 70 >= expected[1]
    inputs = batch.inputs
    embeds = model.embed(inputs.input_ids, inputs.images)[0]
    placeholders = inputs.input_ids[0] == model.image_token_id
    assert int(placeholders.sum()) == sum(expected)
    with torch.no_grad():
        alone = [expected_visual_tokens(model, inputs.images, index) for index in range(2)]
    torch.testing.assert_close(embeds[0][placeholders], torch.cat(alone), atol=1e-5, rtol=1e-4)
    model.zero_grad()
    model.sample_losses(inputs).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_losses_are_attributed_to_each_images_budget_in_proportion():
    from vlmtrain.data.batch import Batch
    from vlmtrain.modeling.vlm import SampleLosses
    from vlmtrain.train.module import losses_by_budget

    # sample 0: images at 1120 and 70; sample 1: one at 70; sample 2: text only
    ones = torch.ones(3, 2, dtype=torch.long)
    pixels, positions = torch.zeros(3, 3, dtype=torch.uint8), torch.zeros(3, 2, dtype=torch.long)
    images = ImageBatch(pixels, positions, ones, ones, torch.tensor([0, 0, 1]))
    inputs = ModelInput(
        torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long), images
    )
    losses = SampleLosses(loss_sum=torch.tensor([6.0, 2.0, 9.0]), tokens=torch.tensor([3.0, 1.0, 3.0]), correct=torch.zeros(3))
    independent = losses_by_budget(Batch(inputs, None, image_budgets=[1120, 70, 70]), losses)
    assert independent.keys() == {70, 1120}
    assert float(independent[1120]) == pytest.approx(6.0 / 3.0)  # only sample 0, weight 1/2 on both sums
    assert float(independent[70]) == pytest.approx((0.5 * 6 + 2) / (0.5 * 3 + 1))
    shared = losses_by_budget(Batch(inputs, 140, image_budgets=[140, 140, 140]), losses)
    assert shared.keys() == {140} and float(shared[140]) == pytest.approx(
        17.0 / 7.0
    )  # the batch's mean, text-only sample included


@pytest.mark.parametrize("row_tokens", [None, 400])
def test_packed_rows_give_the_per_sample_losses_and_gradients_of_padded_rows(tiny_model, real_samples, chat_dir, row_tokens):
    """Mixed lengths, grids and budgets, a text-only sample, multi-image conversations: packed equals padded
    (fp32, 1e-5), in one row or in several."""
    model, builder = tiny_model
    builder = BatchBuilder(model.geometry, builder.text, replace(builder.fields, max_length=400), builder.decoding)
    conversations = [
        s for url in sorted(map(str, chat_dir.glob("train-*.tar"))) for s in read_shard(url) if isinstance(s, RawSample)
    ]
    pair = next(s for s in conversations if len(s.sizes) == 2)
    text_only = next(s for s in conversations if not s.sizes)
    chosen = [real_samples[0], pair, real_samples[5], text_only, real_samples[14]]
    budgets = [70, (280, 70), 140, (), 70]
    encoded = [builder.encode(sample, budget) for sample, budget in zip(chosen, budgets, strict=True)]
    results = {}
    for packed in (True, False):
        inputs = builder.collate(encoded, None, packed=packed, row_tokens=row_tokens).inputs
        results[packed] = (*losses_and_grads(model, inputs), inputs)
    (packed, packed_grads, packed_inputs), (padded, padded_grads, padded_inputs) = results[True], results[False]
    assert packed_inputs.attention_mask is None and padded_inputs.attention_mask is not None
    assert (
        packed_inputs.input_ids.numel() == sum(len(e.text.input_ids) for e in encoded) or row_tokens
    )  # one row: no padding at all
    if row_tokens:  # rows of at most row_tokens, but for a sample longer than that, alone in its row
        assert packed_inputs.input_ids.shape[0] > 1
        assert packed_inputs.input_ids.shape[1] == max(row_tokens, max(len(e.text.input_ids) for e in encoded))
    torch.testing.assert_close(packed.loss_sum, padded.loss_sum, atol=1e-5, rtol=1e-5)
    assert packed.tokens.tolist() == padded.tokens.tolist() and packed.correct.tolist() == padded.correct.tolist()
    assert packed.tokens.tolist()[3] > 0  # the text-only sample is trained on
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_samples_of_equal_length_keep_their_own_losses(tiny_model, real_samples):
    """Same-length samples side by side (each caption beside itself reversed: equal tokens, other labels), in
    one row and in rows of two: each keeps its padded loss, so no same-length sequences are mixed up."""
    model, builder = tiny_model
    chosen = []
    for sample in (real_samples[1], real_samples[7]):
        reversed_text = {**sample.record, "text": sample.record["text"][::-1]}
        chosen += [sample, replace(sample, key=sample.key + "-reversed", record=reversed_text)]
    encoded = [builder.encode(sample, 70) for sample in chosen]
    lengths = [len(e.text.input_ids) for e in encoded]
    assert lengths[0] == lengths[1] and lengths[2] == lengths[3]
    padded = model.sample_losses(builder.collate(encoded, None, packed=False).inputs).loss_sum
    assert len(set(padded.tolist())) == 4  # four different losses: a swap would show
    for row_tokens in (None, lengths[0] + lengths[2]):
        packed = model.sample_losses(builder.collate(encoded, None, packed=True, row_tokens=row_tokens).inputs).loss_sum
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm", [TINY_LLAMA, {**TINY_GEMMA4_TEXT, "final_logit_softcapping": 0.5}], ids=["llama", "gemma4"])
def test_the_chunked_loss_gives_the_plain_losses_and_gradients(real_samples, lm):
    """model.lm.loss_chunk_tokens: the head and the loss 7 labelled tokens at a time (a chunk size that divides
    nothing), Gemma's logit soft-capping included, equal the whole logits' (fp32, 1e-5)."""
    torch.manual_seed(0)
    config = ModelConfig(vision=VisionConfig(patch_size=16, width=32, depth=1, heads=2),
                         pooling=PoolingConfig(kind="average", size=2), lm=LMConfig(hf_config=lm, loss_chunk_tokens=7))
    tokenizer = lm_tokenizer(config.lm)
    model = build_model(describe_model(config, BudgetConfig()), Start.of(config), tokenizer)
    fields = TextConfig(prompt="Look: <image> says", target_field="text", max_length=96)
    builder = BatchBuilder(model.geometry, TextEncoder(tokenizer, "<image>"), fields, DecodingConfig())
    inputs = builder.collate([builder.encode(sample, 70) for sample in real_samples[:5]], 70, packed=True).inputs
    results = {}
    for chunk in (7, 0):
        model.loss_chunk = chunk
        results[chunk] = losses_and_grads(model, inputs)
    (chunked, chunked_grads), (plain, plain_grads) = results[7], results[0]
    torch.testing.assert_close(chunked.loss_sum, plain.loss_sum, atol=1e-5, rtol=1e-5)
    assert chunked.tokens.tolist() == plain.tokens.tolist() and chunked.correct.tolist() == plain.correct.tolist()
    assert int(plain.tokens.sum()) > 7 * 3  # several chunks
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_chunked_loss_refuses_an_lm_whose_logits_it_does_not_know():
    from vlmtrain.modeling.loss import check_plain_head

    with pytest.raises(UserError, match=r"^model.lm.loss_chunk_tokens: the chunked loss knows how .* not 'cohere'; set it to 0$"):
        check_plain_head("cohere")


def test_packed_position_ids_restart_at_every_sample_and_attention_stays_inside_it(tiny_model, real_samples):
    """A sample's logits in a packed row equal its logits alone: nothing leaks across the boundary."""
    model, builder = tiny_model
    encoded = [builder.encode(sample, 70) for sample in real_samples[:3]]
    inputs = builder.collate(encoded, 70).inputs
    lengths = [len(e.text.input_ids) for e in encoded]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert inputs.position_ids[0].tolist() == [i for length in lengths for i in range(length)]
    assert inputs.sequence_ids[0].tolist() == [n for n, length in enumerate(lengths) for _ in range(length)]
    with torch.no_grad():
        packed = model(inputs)[0]
        for index, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            alone = model(builder.collate([encoded[index]], 70, packed=False).inputs)[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "lm_config",
    [
        {**TINY_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 4},
        {**TINY_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2},
        {**TINY_GEMMA4_TEXT, "sliding_window": 4},  # a sliding-window layer (window 4 < the longest sample, 12)
    ],
    ids=["llama", "llama-gqa", "gemma4-sliding"],
)
def test_lm_packed_rows_attend_per_sample_with_every_attention_implementation(lm_config: dict):
    """vlmtrain_varlen (offsets given, or found from position ids) equals transformers' sdpa with its
    block-diagonal mask, and each sample's logits equal the sample alone; rows with a padding mask go to SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlmtrain.data.batch import pack_text
    from vlmtrain.modeling.attention import VARLEN

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**lm_config, "vocab_size": 50, "pad_token_id": 0})
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    lengths = [7, 1, 12, 5]
    sequences = [torch.randint(0, 50, (n,)).tolist() for n in lengths]
    ids, positions, _, _, cu = pack_text(sequences, sequences, pad_id=0, row_tokens=14)
    assert cu.tolist() == [0, 7, 8, 12, 24, 29, 36]  # rows as long as the longest: [7, 1, pad 4], [12], [5, pad 7]
    with torch.no_grad():
        block_mask = lm(ids, position_ids=positions, use_cache=False).logits  # with a cache, sdpa would not see the packing
        lm.set_attn_implementation(VARLEN)
        offsets = lm(ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12).logits
        found = lm(ids, position_ids=positions).logits
        padded, mask = torch.zeros(4, 12, dtype=torch.long), torch.zeros(4, 12, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            padded[row, : len(sequence)], mask[row, : len(sequence)] = torch.tensor(sequence), 1
        rows = lm(padded, attention_mask=mask).logits
    torch.testing.assert_close(offsets, block_mask, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(found, block_mask, atol=1e-5, rtol=1e-4)
    flat = offsets.reshape(-1, offsets.shape[-1])
    for index, (start, length) in enumerate([(0, 7), (7, 1), (12, 12), (24, 5)]):
        torch.testing.assert_close(flat[start : start + length], rows[index, :length], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lockstep", [False, True])
def test_images_of_several_budget_levels_run_in_bins_and_equal_each_image_alone(monkeypatch, lockstep: bool):
    """One process: the conv stem runs per grid; several (ZeRO-3): once per bin and aspect class, every one
    called (blank when empty), images of a like shape on one canvas. Same features."""
    monkeypatch.setattr("vlmtrain.modeling.backbone.in_lockstep", lambda: lockstep)
    torch.manual_seed(0)
    geometry = Geometry(patch_size=8, pool=2)
    vit = NativeViT(patch_size=8, width=32, depth=1, heads=2, stem="conv").eval()
    vit.bins = (70 * 4, 280 * 4)
    sizes = [((60, 90), 280), ((40, 40), 70), ((90, 50), 280), ((30, 100), 70), ((50, 90), 280)]
    parts = [image_batch(geometry, [size], budget, seed=index) for index, (size, budget) in enumerate(sizes)]
    packed = ImageBatch(
        *(torch.cat([getattr(part, name) for part in parts]) for name in ("pixels", "positions", "patch_grids", "token_grids")),
        torch.arange(len(parts)),
    )
    grids = [tuple(grid) for grid in packed.patch_grids.tolist()]
    assert len(set(grids)) == 5 and aspect_class(grids[0], 8) == aspect_class(grids[4], 8)  # two grids share a canvas
    calls = []
    vit.stem.convs[0].register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with torch.no_grad():
        together = vit(packed.pixels, packed.positions, packed.patch_grids)
    assert (len(calls), sum(calls)) == ((2 * 8, 2 * 8 - 4 + 5) if lockstep else (5, 5))  # 4 groups hold the 5 images
    with torch.no_grad():
        for index, part in enumerate(parts):
            alone = vit(part.pixels, part.positions, part.patch_grids)
            torch.testing.assert_close(together[image_rows(packed, index)], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_a_lora_adapter_holds_only_what_trained_and_reloads_to_the_same_logits(tmp_path, tied):
    # a base LM whose vocabulary lacks the image token: its rows are added, the mean of the base's rows
    tokenizer = build_byte_tokenizer(image_token="<img>")
    build_lm(LMConfig(hf_config={**TINY_LLAMA, "tie_word_embeddings": tied}), tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base_weights = load_file(tmp_path / "base" / "model.safetensors")
    config = LMConfig(path=str(tmp_path / "base"), lora=LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    tokenizer = lm_tokenizer(config)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    trained = build_lm(config, tokenizer)
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for name in names:
        rows = base_weights[name]
        assert image_token == rows.shape[0]
        torch.testing.assert_close(trained.get_base_model().state_dict()[name][image_token], rows.mean(dim=0))
    with torch.no_grad():  # as if trained: every adapter parameter away from its initial value
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    save_adapter_folder(trained, tmp_path / "adapter")

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    width, layers = TINY_LLAMA["hidden_size"], TINY_LLAMA["num_hidden_layers"]
    kv_width = width // TINY_LLAMA["num_attention_heads"] * TINY_LLAMA["num_key_value_heads"]
    lora_values = layers * 4 * (width + width + width + kv_width)  # q_proj and v_proj: A (4 x in) and B (out x 4)
    assert sum(tensor.numel() for tensor in saved.values()) == lora_values  # no embedding matrix

    torch.manual_seed(1)  # another seed: the added rows must not depend on it
    base = build_lm(replace(config, lora=LoraConfig()), tokenizer)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    tokens = torch.tensor([[3, 40, image_token, 41, 7]])
    with torch.no_grad():
        expected = trained.eval()(input_ids=tokens).logits
        torch.testing.assert_close(reloaded.eval()(input_ids=tokens).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.merge_and_unload()(input_ids=tokens).logits, expected)


def test_the_gemma4_projector_is_gemma4s_multimodal_embedder():
    from transformers import Gemma4TextConfig, Gemma4VisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder

    from vlmtrain.modeling.projector import build_projector

    torch.manual_seed(0)
    projector = build_projector("gemma4", 48, None, 64)
    embedder = Gemma4MultimodalEmbedder(Gemma4VisionConfig(hidden_size=48), Gemma4TextConfig(hidden_size=64))
    embedder.load_state_dict(projector.state_dict())  # the same names: a native Gemma 4 checkpoint's embed_vision
    tokens = torch.randn(10, 48) * 30
    torch.testing.assert_close(projector(tokens), embedder(tokens), rtol=0, atol=0)
    assert projector.hidden_size is None and sum(p.numel() for p in projector.parameters()) == 48 * 64
