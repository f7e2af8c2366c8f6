"""Decoding images to RGB and cutting them into patches at the size the geometry gives."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from vlmtrain.data.samples import SampleError
from vlmtrain.geometry import ImageGeometry


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB predictably: alpha composited over white, 16-bit scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes to an RGB image, EXIF orientation applied, the first frame of an animation.

    Raises :class:`SampleError` (kind ``image``) for undecodable data or more than ``max_pixels`` pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise SampleError("image", f"{image.width}x{image.height} exceeds max_image_pixels={max_pixels}")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except SampleError:
        raise
    except Exception as error:  # PIL raises many types for corrupt data
        raise SampleError("image", f"cannot decode image: {type(error).__name__}: {error}") from None


def resize_to(image: Image.Image, geometry: ImageGeometry) -> Image.Image:
    """Resize to the geometry's pixel size (bicubic, as Gemma 4's processor does)."""
    height, width = geometry.resize
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def patchify(image: Image.Image, geometry: ImageGeometry, patch_size: int) -> torch.Tensor:
    """Resize and cut into patches: ``(rows*cols, patch*patch*3)`` uint8, row-major over the patch grid,
    each patch flattened as (row, col, channel) like Gemma 4 and SigLIP2."""
    rows, cols = geometry.patch_grid
    pixels = torch.from_numpy(np.asarray(resize_to(image, geometry), dtype=np.uint8).copy())
    patches = pixels.view(rows, patch_size, cols, patch_size, 3).permute(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * 3)


def patch_positions(geometry: ImageGeometry) -> torch.Tensor:
    """(x, y) of every patch in row-major order, shape ``(rows*cols, 2)``."""
    rows, cols = geometry.patch_grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)
