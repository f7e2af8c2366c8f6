"""An image as the model takes it: RGB, resized to the size its geometry gives, cut into patches.

Used by training (the data pipeline) and by every exported model's processor, so that an image becomes the
same pixels everywhere; depends on torch, numpy and PIL only (an export ships this file)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .geometry import ImageGeometry


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


def image_patches(
    image: Image.Image | Sequence[Image.Image], geometry: ImageGeometry, patch_size: int, frames: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """An image as the model takes it: its patches at the geometry's size (:func:`patchify`) and their (x, y)
    positions (:func:`patch_positions`). With ``frames`` > 1 each patch row holds that many frames side by side
    (Qwen-VL's temporal patch): a video's consecutive frames (a sequence of images), an image (or the last frame
    of a video) repeated to fill them."""
    given = [image] if isinstance(image, Image.Image) else list(image)
    if not 1 <= len(given) <= frames:
        raise ValueError(f"{len(given)} frames for patches of {frames}")
    patches = [patchify(frame, geometry, patch_size) for frame in given]
    patches += patches[-1:] * (frames - len(patches))
    return (patches[0] if frames == 1 else torch.cat(patches, dim=1)), patch_positions(geometry)


@lru_cache(maxsize=4096)
def patch_positions(geometry: ImageGeometry) -> torch.Tensor:
    """(x, y) of every patch in row-major order, shape ``(rows*cols, 2)`` (shared: do not modify)."""
    rows, cols = geometry.patch_grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)
