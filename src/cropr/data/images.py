"""Image mode handling shared by the code paths that open image files."""

from __future__ import annotations

from PIL import Image

_UINT16_MAX = 65535


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image; 16-bit and 32-bit integer modes are scaled to 8 bits by their value range (full 16-bit
    range for I;16) instead of clipped.

    Pillow's own `convert("RGB")` clips integer pixels at 255, which turns most of a 16-bit image white.

    Args:
        image: any Pillow image. `I;16*` modes are scaled from `[0, 65535]`; mode `I` (32-bit signed) from the image's
            own minimum and maximum; every other mode goes through `convert("RGB")`.

    Returns:
        A new image in mode `RGB`.
    """
    if image.mode.startswith("I;16"):
        low, high = 0, _UINT16_MAX
    elif image.mode == "I":
        low, high = image.getextrema()
    else:
        return image.convert("RGB")
    scale = 255 / max(high - low, 1)
    # `point` on mode I applies only `value * scale + offset`; +0.5 rounds, since the result is truncated to an integer.
    scaled = image.convert("I").point(lambda value: value * scale + (0.5 - low * scale))
    return scaled.convert("L").convert("RGB")
