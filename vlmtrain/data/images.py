"""Decoding images to RGB and cutting them into patches at the size the geometry gives."""

from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
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


_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def decode_image(
    data: bytes, max_pixels: int, expected_size: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode encoded image bytes to an RGB image, EXIF orientation applied, the first frame of an animation.

    ``expected_size`` (height, width, as displayed) is checked before any pixel is decoded. ``target_size``
    is the size the caller will resize to: a JPEG at least twice as large is decoded at 1/2, 1/4 or 1/8
    scale (never below the target), which is several times faster than a full decode. Raises
    :class:`SampleError`: kind ``image`` for undecodable data or more than ``max_pixels`` pixels, kind
    ``size_mismatch`` when the image is not ``expected_size``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise SampleError("image", f"{image.width}x{image.height} exceeds max_image_pixels={max_pixels}")
            swaps = image.getexif().get(0x0112, 1) in _SWAPS_AXES
            displayed = (image.width, image.height) if swaps else (image.height, image.width)
            if expected_size is not None and displayed != tuple(expected_size):
                raise SampleError(
                    "size_mismatch",
                    f"image is {displayed[1]}x{displayed[0]}, its record says {expected_size[1]}x{expected_size[0]}",
                )
            if target_size is not None and image.format == "JPEG":
                height, width = target_size
                image.draft(None, (height, width) if swaps else (width, height))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except SampleError:
        raise
    except Exception as error:  # PIL raises many types for corrupt data
        raise SampleError("image", f"cannot decode image: {type(error).__name__}: {error}") from None


def resized_pixels(image: Image.Image, geometry: ImageGeometry) -> torch.Tensor:
    """``(height, width, 3)`` uint8 pixels at the geometry's size: antialiased bicubic, as Gemma 4's processor
    resizes (torch's uint8 kernel: within one grey level of PIL's, several times faster)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    if tuple(pixels.shape[:2]) == geometry.resize:
        return pixels
    resized = F.interpolate(pixels.permute(2, 0, 1)[None], size=geometry.resize, mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0)


def patchify(image: Image.Image, geometry: ImageGeometry, patch_size: int) -> torch.Tensor:
    """Resize and cut into patches: ``(rows*cols, patch*patch*3)`` uint8, row-major over the patch grid,
    each patch flattened as (row, col, channel) like Gemma 4 and SigLIP2."""
    rows, cols = geometry.patch_grid
    patches = resized_pixels(image, geometry).reshape(rows, patch_size, cols, patch_size, 3).permute(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * 3)


def image_patches(image: Image.Image, geometry: ImageGeometry, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image as the model takes it: its patches at the geometry's size (:func:`patchify`) and their
    (x, y) positions (:func:`patch_positions`)."""
    return patchify(image, geometry, patch_size), patch_positions(geometry)


@lru_cache(maxsize=4096)
def patch_positions(geometry: ImageGeometry) -> torch.Tensor:
    """(x, y) of every patch in row-major order, shape ``(rows*cols, 2)`` (shared: do not modify)."""
    rows, cols = geometry.patch_grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)
