"""Budget geometry: exact agreement with Gemma 4's image processor, and the invariants as properties."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil, get_aspect_ratio_preserving_size

from vlmtrain.errors import UserError
from vlmtrain.modeling.geometry import LEVELS, BudgetError, Geometry, ImageSizeError, geometry_table, parse_size
from vlmtrain.modeling.pixels import patch_positions, patchify, to_rgb

GEMMA4 = Geometry(patch_size=16, pool=3)
IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"


def random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """(height, width) pairs: uniform sizes, and aspect ratios from 1:20 to 20:1 at many scales."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        if rng.random() < 0.5:
            sizes.append((rng.randint(1, 4000), rng.randint(1, 4000)))
        else:
            ratio = math.exp(rng.uniform(math.log(1 / 20), math.log(20)))
            short = rng.randint(1, 800)
            sizes.append((short, max(1, round(short * ratio))) if ratio >= 1 else (max(1, round(short / ratio)), short))
    return sizes


def test_resize_equals_gemma4_for_thousands_of_sizes():
    for height, width in random_sizes(20000, seed=1):
        for budget in LEVELS:
            expected = get_aspect_ratio_preserving_size(
                height, width, patch_size=16, max_patches=budget * 9, pooling_kernel_size=3
            )
            assert GEMMA4.image(height, width, budget).resize == expected, (height, width, budget)


@pytest.mark.parametrize("seed", range(6))
def test_whole_processor_agrees_on_size_tokens_positions_and_pixels(seed):
    """A shipped photo stretched to a random size (1:20 to 20:1) through Gemma4ImageProcessorPil and through
    our transform: sizes, token counts and positions exactly equal; pixels within rounding of the kernel."""
    rng = random.Random(seed)
    (height, width), budget = random_sizes(1, seed=100 + seed)[0], rng.choice(LEVELS)
    height, width = min(height, 1500), min(width, 1500)
    photo = sorted(IMAGES.glob("*.jpg"))[seed % 4]
    image = to_rgb(Image.open(photo)).resize((width, height), Image.Resampling.BICUBIC)
    out = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images=[image], return_tensors="pt")

    geometry = GEMMA4.image(height, width, budget)
    assert out["num_soft_tokens_per_image"][0] == geometry.tokens
    real = (out["image_position_ids"][0] >= 0).all(-1)
    assert int(real.sum()) == geometry.patches
    assert out["pixel_values"].shape[1] == GEMMA4.max_patches(budget)
    assert torch.equal(out["image_position_ids"][0][real], patch_positions(geometry))
    # pixels: both are antialiased bicubic; torch's uint8 kernel rounds a few pixels differently from PIL's
    grey_levels = (patchify(image, geometry, 16).float() - out["pixel_values"][0][real].float() * 255).abs()
    assert float(grey_levels.max()) <= 2.0 + 1e-3
    assert float(grey_levels.mean()) < 0.1  # bilinear instead of bicubic differs by ~0.66


QWEN_FAMILIES = {  # (patch, merge, min_pixels) of Qwen2.5-VL's and Qwen3-VL's processors
    "qwen2.5-vl": (14, 2, 56 * 56),
    "qwen3-vl": (16, 2, 65536),
}


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_smart_resize_equals_qwens_own_for_thousands_of_sizes(family):
    # what Qwen's processors compute at max_pixels = budget x cell², except where theirs passes the budget
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge, min_pixels = QWEN_FAMILIES[family]
    geometry, cell = Geometry(patch, merge, rule="smart_resize", min_pixels=min_pixels), patch * merge
    capped = 0
    for height, width in random_sizes(6000, seed=3) + [(1, 1), (1, 200), (200, 1), (5, 900), (27, 28), (28, 28)]:
        for budget in LEVELS:
            if max(height, width) / min(height, width) > 200:
                with pytest.raises(ImageSizeError, match="more elongated than 200:1"):
                    geometry.image(height, width, budget)
                continue
            theirs = smart_resize(height, width, factor=cell, min_pixels=min_pixels, max_pixels=budget * cell**2)
            ours = geometry.image(height, width, budget)
            assert ours.tokens <= budget and ours.patch_grid == (ours.resize[0] // patch, ours.resize[1] // patch)
            if (theirs[0] // cell) * (theirs[1] // cell) <= budget:
                assert ours.resize == theirs, (height, width, budget)
            else:  # Qwen's short side held at one cell (or grown to min_pixels), its long side past the budget: cut
                capped += 1
                short = 0 if theirs[0] < theirs[1] else 1
                assert ours.resize[short] == theirs[short] and ours.resize[1 - short] == budget // (theirs[short] // cell) * cell
    assert capped < 0.02 * 6000 * len(LEVELS)  # extreme aspect ratios only


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_smart_resize_gives_the_grid_qwens_image_processor_gives(family):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch, merge, min_pixels = QWEN_FAMILIES[family]
    geometry = Geometry(patch, merge, rule="smart_resize", min_pixels=min_pixels)
    for (height, width), budget in zip(random_sizes(10, seed=7), [*LEVELS, *LEVELS], strict=True):
        height, width = min(height, 1500), min(width, 1500)
        processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": min_pixels, "longest_edge": budget * (patch * merge) ** 2}, patch_size=patch, merge_size=merge
        )
        grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0].tolist()
        expected = geometry.image(height, width, budget)
        assert grid == [1, *expected.patch_grid] and expected.tokens == grid[1] * grid[2] // merge**2, (height, width, budget)


@settings(max_examples=400, deadline=None)
@given(
    height=st.integers(1, 30000),
    width=st.integers(1, 30000),
    budget=st.sampled_from(LEVELS),
    patch=st.sampled_from([8, 14, 16]),
    pool=st.integers(1, 4),
    rule=st.sampled_from(["fill", "smart_resize"]),
)
def test_geometry_invariants(height, width, budget, patch, pool, rule):
    assume(rule == "fill" or max(height, width) <= 200 * min(height, width))
    geometry = Geometry(patch_size=patch, pool=pool, rule=rule, min_pixels=4 * (patch * pool) ** 2 if rule != "fill" else 0)
    g = geometry.image(height, width, budget)
    cell = patch * pool
    resized_h, resized_w = g.resize
    assert 1 <= g.tokens <= budget
    assert resized_h % cell == 0 and resized_w % cell == 0 and resized_h > 0 and resized_w > 0
    assert g.patch_grid == (resized_h // patch, resized_w // patch)
    assert g.token_grid == (resized_h // cell, resized_w // cell)
    assert g.patches == g.tokens * pool * pool <= geometry.max_patches(budget)


def searched_grid(height: int, width: int, budget: int) -> tuple[tuple[int, int], tuple[bool, bool]]:
    """The token grid by search: the most rows r (and columns c) whose cells, once the image is scaled to
    the budget's area, stay inside it: r² · width ≤ budget · height (exact integers). An image too thin for
    one row (or column) gets one, and its long side keeps the ratio up to the budget. Also whether each side
    sits exactly on a boundary, where Gemma 4's floating-point arithmetic may round one cell down."""
    rows = max(r for r in range(budget + 1) if r * r * width <= budget * height)
    cols = max(c for c in range(budget + 1) if c * c * height <= budget * width)
    exact = (rows * rows * width == budget * height, cols * cols * height == budget * width)
    if rows == 0 or cols == 0:
        ratio = min(max(height, width) // min(height, width), budget)
        return ((1, ratio) if height <= width else (ratio, 1)), (False, False)
    return (rows, cols), exact


@pytest.mark.slow
@pytest.mark.parametrize("pool", [1, 3])
def test_the_token_grid_equals_a_search_over_all_cell_aligned_sizes(pool):
    geometry = Geometry(patch_size=16, pool=pool)
    rounded_down = 0
    for budget in LEVELS:
        for height in range(1, 97):
            for width in range(1, 97):
                found = geometry.image(height, width, budget).token_grid
                expected, exact = searched_grid(height, width, budget)
                for side in (0, 1):
                    assert found[side] == expected[side] or (exact[side] and found[side] == expected[side] - 1), (
                        height,
                        width,
                        budget,
                    )
                rounded_down += found != expected
    assert rounded_down < 30  # only on exact boundaries (e.g. 55x154 at 70 tokens, pool 3: 5 rows by search, 4 by Gemma 4)


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 10000), width=st.integers(1, 10000), rule=st.sampled_from(["fill", "smart_resize"]))
def test_more_budget_never_gives_fewer_tokens(height, width, rule):
    assume(rule == "fill" or max(height, width) <= 200 * min(height, width))
    geometry = GEMMA4 if rule == "fill" else Geometry(14, 2, rule="smart_resize", min_pixels=3136)
    tokens = [geometry.image(height, width, budget).tokens for budget in LEVELS]
    assert tokens == sorted(tokens)


def test_known_sizes_from_the_gemma4_processor():
    assert GEMMA4.image(768, 1024, 280).resize == (672, 912)
    assert GEMMA4.image(768, 1024, 280).tokens == 266
    assert GEMMA4.image(768, 1024, 1120).resize == (1344, 1824)
    assert GEMMA4.image(768, 1024, 1120).tokens == 1064
    assert GEMMA4.image(10, 10, 70).resize == (384, 384)  # small images are upscaled


@pytest.mark.parametrize("budget", [0, 100, 281, 2240, -70, 280.0, True, "280"])
def test_unknown_budget_is_refused_with_the_allowed_levels(budget):
    with pytest.raises(BudgetError, match="allowed levels: 70, 140, 280, 560, 1120"):
        GEMMA4.image(100, 100, budget)


def test_a_restricted_geometry_refuses_levels_it_does_not_serve():
    geometry = Geometry(16, 3, levels=(70, 140))
    assert geometry.image(100, 100, 140).tokens <= 140
    with pytest.raises(BudgetError, match="allowed levels: 70, 140$"):
        geometry.image(100, 100, 280)
    with pytest.raises(BudgetError):
        Geometry(16, 3, levels=(70, 100))


def test_parse_size_and_table():
    assert parse_size("1024x768") == (768, 1024)
    for bad in ("1024", "axb", "0x5", "10x"):
        with pytest.raises(UserError):
            parse_size(bad)
    table = geometry_table(GEMMA4, 768, 1024)
    assert "912x672" in table and "1824x1344" in table
    assert [line.split()[0] for line in table.splitlines()[2:]] == [str(level) for level in LEVELS]
