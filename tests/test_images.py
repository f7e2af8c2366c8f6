"""Decoding to RGB and patchifying: every mode converts predictably, bad bytes raise SampleError."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import convert_image_to_patches

from vlmtrain.data.images import decode_image
from vlmtrain.data.samples import SampleError
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.pixels import patch_positions, patchify, to_rgb


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_modes_convert_to_rgb_predictably():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16") and to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert to_rgb(mid).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGB", (2, 2), (1, 2, 3))).mode == "RGB"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif), max_pixels=10**6)
    assert decoded.size == (10, 30)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, 10**6).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("data", [b"", b"not an image", encode(Image.new("RGB", (64, 64)), "JPEG")[:200]])
def test_corrupt_bytes_raise_a_sample_error(data):
    with pytest.raises(SampleError) as caught:
        decode_image(data, 10**6)
    assert caught.value.kind == "image"


def test_pixel_cap_guards_against_decompression_bombs():
    with pytest.raises(SampleError, match="exceeds max_image_pixels"):
        decode_image(encode(Image.new("L", (2000, 2000))), max_pixels=1_000_000)


def test_patch_layout_matches_gemma4_and_positions_are_row_major():
    geometry = Geometry(patch_size=4, pool=2).image(16, 24, 70)
    pixels = np.random.default_rng(0).integers(0, 256, size=(*geometry.resize, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = convert_image_to_patches(pixels.transpose(2, 0, 1), 4)
    assert torch.equal(patchify(image, geometry, 4), torch.from_numpy(expected))
    positions = patch_positions(geometry)
    rows, cols = geometry.patch_grid
    assert (
        positions[1].tolist() == [1, 0] and positions[cols].tolist() == [0, 1] and positions[-1].tolist() == [cols - 1, rows - 1]
    )
