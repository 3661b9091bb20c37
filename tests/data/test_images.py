"""`to_rgb`: 16-bit greyscale images are scaled to 8 bits, not clamped as PIL's own conversion does."""

import numpy as np
import pytest
from PIL import Image

from cropr.data.images import to_rgb


def sixteen_bit(values: np.ndarray, mode: str = "I;16") -> Image.Image:
    image = Image.fromarray(values.astype(np.uint16))
    return image if mode == "I;16" else image.convert(mode)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_to_eight_bits(mode):
    values = np.array([[0, 257, 32896], [65535, 1000, 50000]])
    rgb = to_rgb(sixteen_bit(values, mode))
    assert rgb.mode == "RGB"
    pixels = np.asarray(rgb)
    assert (pixels == pixels[..., :1]).all()  # grey stays grey
    np.testing.assert_array_equal(pixels[..., 0], np.round(values / 257).astype(np.uint8))


def test_sixteen_bit_png_from_disk_keeps_its_contrast(tmp_path):
    # PIL's convert("RGB") clamps every value above 255: this gradient would be white but for its darkest pixels.
    gradient = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "gradient.png")
    with Image.open(tmp_path / "gradient.png") as image:
        assert image.mode in ("I;16", "I")
        pixels = np.asarray(to_rgb(image))[..., 0]
    assert (pixels == 255).mean() < 0.01
    assert pixels.max() == round(gradient.max() / 257)


def test_an_rgb_image_read_from_a_closed_file_stays_readable(tmp_path):
    Image.fromarray(np.full((3, 4, 3), 11, np.uint8)).save(tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.png") as opened:
        converted = to_rgb(opened)
    assert np.asarray(converted).max() == 11


def test_other_modes_go_through_pil():
    rgb = Image.fromarray(np.full((2, 2, 3), 7, np.uint8))
    converted = to_rgb(rgb)
    assert converted is not rgb  # a copy, so it outlives the file the image was read from
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(rgb))
    grey = Image.fromarray(np.full((2, 2), 200, np.uint8))
    np.testing.assert_array_equal(np.asarray(to_rgb(grey)), np.full((2, 2, 3), 200))
    rgba = Image.fromarray(np.full((2, 2, 4), 9, np.uint8))
    assert to_rgb(rgba).mode == "RGB"


def test_integer_images_beyond_sixteen_bits_are_refused():
    wide = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    with pytest.raises(ValueError, match="values 0..70000"):
        to_rgb(wide)
