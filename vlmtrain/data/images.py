"""Decoding image bytes to RGB (the pixels themselves: :mod:`vlmtrain.modeling.pixels`)."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from vlmtrain.data.samples import SampleError
from vlmtrain.modeling.pixels import to_rgb

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
