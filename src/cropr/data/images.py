"""Image helpers shared by the training scripts, the command line and the tools.

[`to_rgb`] converts any PIL image to 8-bit RGB. PIL's own `convert("RGB")` clamps 16-bit greyscale images (modes
`"I;16"` and `"I"`, as 16-bit PNGs open) to 255, which turns most of their pixels white; here they are scaled to
8 bits instead.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes of integer images wider than 8 bits, which [`to_rgb`] scales rather than clamps."""

MAX_16_BIT = 65535

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
"""Photos shipped with scikit-image (`skimage.data`): real images for the demo and the pipeline benchmark."""


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of `image`, as models' image processors expect.

    16-bit greyscale images (the modes in [`WIDE_INTEGER_MODES`]) are mapped linearly from the full 16-bit range
    `[0, 65535]` to `[0, 255]` (a division by 257), the same mapping for every image so that intensities keep their
    meaning across a dataset. Every other mode goes through PIL's `convert("RGB")`.

    Args:
        image (`PIL.Image.Image`): the image, in any mode.

    Returns:
        `PIL.Image.Image`: a new, loaded image of mode `"RGB"` (also when `image` is RGB already, so that it outlives
        the file `image` was read from).

    Raises:
        ValueError: for a 32-bit integer image (mode `"I"`) holding values outside the 16-bit range.
    """
    if image.mode in WIDE_INTEGER_MODES:
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > MAX_16_BIT:
            raise ValueError(
                f"cannot convert a {image.mode!r} image with values {low}..{high} to RGB: only the 16-bit range "
                f"0..{MAX_16_BIT} has a defined 8-bit mapping; rescale the image to 8 bits first"
            )
        image = Image.fromarray(np.round(values / (MAX_16_BIT / 255)).astype(np.uint8))
    return image.convert("RGB")


__all__ = ["WIDE_INTEGER_MODES", "to_rgb"]


def sample_photo(name: str) -> Image.Image:
    """The scikit-image sample photo `name` (one of [`SAMPLE_PHOTOS`]) as an RGB image.

    Raises:
        ImportError: when scikit-image is not installed (it comes with `pip install "cropr[demo]"`).
        ValueError: for a name not in [`SAMPLE_PHOTOS`].
    """
    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"{name!r} is not a sample photo; choose from {SAMPLE_PHOTOS}.")
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError(
            'The sample photos come with scikit-image: pip install scikit-image (or "cropr[demo]").'
        ) from error
    return to_rgb(Image.fromarray(getattr(skimage.data, name)()))
