"""Pruning heat-maps: the drop-block map from kept indices, and the rendered PNG."""

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image

from cropr import CroprViTConfig, CroprViTForImageClassification, CroprViTForSemanticSegmentation
from cropr.tools.visualization import (
    LEGEND_HEIGHT,
    MARGIN,
    MAX_PANEL_SIDE,
    NEVER_DROPPED,
    drop_block_map,
    legend_ticks,
    model_view,
    panel_size,
    render_pruning_heatmap,
    visualize_pruning,
)

# A 2x3 grid (6 patches at positions 1..6, CLS at 0) pruned after blocks 0 and 2:
# module 0 drops patches 2 and 5, module 1 (after block 2) drops patch 6; patches 1, 3, 4 survive.
KEPT = [torch.tensor([0, 3, 1, 6, 4]), np.array([0, 4, 1, 3])]
EXPECTED = np.array([[NEVER_DROPPED, 0, NEVER_DROPPED], [NEVER_DROPPED, 0, 2]])


def test_drop_block_map_hand_built_example():
    drop_map = drop_block_map(KEPT, [0, 2], (2, 3), num_prefix_tokens=1)
    assert drop_map.dtype == np.int64
    np.testing.assert_array_equal(drop_map, EXPECTED)


def test_drop_block_map_without_prefix_tokens():
    drop_map = drop_block_map([[2, 0], [0]], [1, 3], (1, 3), num_prefix_tokens=0)
    np.testing.assert_array_equal(drop_map, [[NEVER_DROPPED, 1, 3]])


@pytest.mark.parametrize(
    ("kept", "blocks", "message"),
    [
        ([[0, 1]], [0, 2], "1 pruning modules but 2"),
        ([[0, 7]], [0], r"positions 0\.\.6"),
        ([[0, 1, 2], [0, 1, 3]], [0, 1], r"keeps positions \[3\]"),
        ([torch.zeros(1, 3, dtype=torch.long)], [0], "must be 1-D"),
    ],
)
def test_drop_block_map_rejects_inconsistent_indices(kept, blocks, message):
    with pytest.raises(ValueError, match=message):
        drop_block_map(kept, blocks, (2, 3), num_prefix_tokens=1)


def test_drop_block_map_matches_model_token_counts():
    config = CroprViTConfig(**tiny_config_kwargs(token_selector="variance"))
    model = CroprViTForImageClassification(config).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 32, 32), output_kept_indices=True)
    drop_map = drop_block_map([k[0] for k in outputs.kept_indices], config.pruning_blocks, config.patch_grid, 1)
    for block, removed in zip(config.pruning_blocks, (4, 3), strict=True):  # the first module also counts the CLS
        assert (drop_map == block).sum() == config.effective_pruning_schedule[block] == removed
    assert (drop_map == NEVER_DROPPED).sum() == config.patch_keep_counts()[-1]


def test_render_writes_png_of_expected_size(tmp_path):
    image = Image.new("RGB", (60, 40), (120, 60, 30))
    path = render_pruning_heatmap(image, EXPECTED, [0, 2], tmp_path / "out" / "map.png", panel_height=100)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (150 + 2 * MARGIN, 100 + LEGEND_HEIGHT + 3 * MARGIN)
        pixels = np.asarray(png.convert("RGB"))
    # The centre of a kept patch shows the image untouched; a dropped one is tinted.
    assert tuple(pixels[MARGIN + 25, MARGIN + 25]) == (120, 60, 30)
    assert tuple(pixels[MARGIN + 25, MARGIN + 75]) != (120, 60, 30)


def test_panel_size_keeps_the_aspect_ratio_within_the_limit():
    assert panel_size((60, 40), 100) == (150, 100)
    assert panel_size((20, 60000), 384) == (1, 384)
    assert panel_size((60000, 20)) == (MAX_PANEL_SIDE, 1)
    assert panel_size((400, 2), 40) == (MAX_PANEL_SIDE, 20)
    for bad in (0, MAX_PANEL_SIDE + 1):
        with pytest.raises(ValueError, match=f"1..{MAX_PANEL_SIDE}"):
            panel_size((60, 40), bad)


def test_render_draws_a_very_wide_image_at_the_width_limit(tmp_path):
    path = render_pruning_heatmap(Image.new("RGB", (400, 2)), EXPECTED, [0, 2], tmp_path / "map.png", panel_height=40)
    with Image.open(path) as png:
        assert png.size == (MAX_PANEL_SIDE + 2 * MARGIN, 20 + LEGEND_HEIGHT + 3 * MARGIN)


def test_render_refuses_a_panel_height_above_the_limit(tmp_path):
    with pytest.raises(ValueError, match=f"1..{MAX_PANEL_SIDE}"):
        render_pruning_heatmap(
            Image.new("RGB", (6, 4)), EXPECTED, [0, 2], tmp_path / "map.png", panel_height=MAX_PANEL_SIDE + 1
        )
    assert not (tmp_path / "map.png").exists()


def test_render_with_mask_adds_a_panel(tmp_path):
    image = Image.new("RGB", (60, 40))
    mask = np.zeros((40, 60), dtype=np.int64)
    mask[:, 30:] = 2
    path = render_pruning_heatmap(
        image,
        EXPECTED,
        [0, 2],
        tmp_path / "map.png",
        segmentation_mask=mask,
        id2label={0: "a", 2: "c"},
        panel_height=80,
    )
    with Image.open(path) as png:
        assert png.size == (2 * 120 + 3 * MARGIN, 80 + LEGEND_HEIGHT + 3 * MARGIN)


def test_render_rejects_blocks_outside_the_schedule(tmp_path):
    with pytest.raises(ValueError, match=r"blocks \[2\]"):
        render_pruning_heatmap(Image.new("RGB", (8, 8)), EXPECTED, [0, 1], tmp_path / "map.png")


def test_visualize_pruning_segmentation_end_to_end(tmp_path):
    from transformers import ViTImageProcessorPil

    config = CroprViTConfig(**tiny_config_kwargs(num_queries=16, num_labels=3))
    model = CroprViTForSemanticSegmentation(config)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    path = visualize_pruning(model, processor, image, tmp_path / "seg.png", panel_height=96)
    with Image.open(path) as png:
        assert png.size == (2 * 128 + 3 * MARGIN, 96 + LEGEND_HEIGHT + 3 * MARGIN)


def test_visualize_pruning_matches_for_16_and_8_bit_images(tmp_path):
    from transformers import ViTImageProcessorPil

    config = CroprViTConfig(**tiny_config_kwargs(num_queries=16, num_labels=3))
    model = CroprViTForSemanticSegmentation(config)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    levels = np.random.default_rng(2).integers(0, 256, (48, 64), dtype=np.uint16)
    paths = [
        visualize_pruning(model, processor, Image.fromarray(array), tmp_path / f"{name}.png", panel_height=48)
        for name, array in (("eight", levels.astype(np.uint8)), ("sixteen", levels * 257))
    ]
    with Image.open(paths[0]) as eight, Image.open(paths[1]) as sixteen:
        np.testing.assert_array_equal(np.asarray(sixteen), np.asarray(eight))


@pytest.mark.parametrize(
    ("size", "box"),
    [
        # Resized to 96x72 (its own size), cropped 64x64: the crop is the middle of the image.
        ({"height": 72, "width": 96}, (16, 4, 80, 68)),
        # Shortest edge 36 (a 48x36 image, half size), cropped 32x32 from (8, 2): (16, 4) to (80, 68) in the image.
        ({"shortest_edge": 36}, (16, 4, 80, 68)),
    ],
)
def test_model_view_is_the_processors_center_crop(size, box):
    from transformers import ViTImageProcessorPil

    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (72, 96, 3), dtype=np.uint8))
    crop = 64 if "height" in size else 32
    processor = ViTImageProcessorPil(
        size=size, do_center_crop=True, crop_size=crop, do_rescale=False, do_normalize=False
    )
    view = model_view(processor, image)
    assert view.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(view), np.asarray(image)[box[1] : box[3], box[0] : box[2]])
    if "height" in size:  # no resampling: the processor's pixels are those very pixels
        pixels = processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(pixels.transpose(1, 2, 0), np.asarray(view))
    # A processor that only resizes sees the whole image.
    assert model_view(ViTImageProcessorPil(size={"height": 32, "width": 32}), image) is image


def test_visualize_pruning_draws_the_center_crop(tmp_path):
    from transformers import ViTImageProcessorPil

    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs()))
    processor = ViTImageProcessorPil(size={"shortest_edge": 36}, do_center_crop=True, crop_size=32)
    # A wide image: its panel is the square crop the model sees, not the whole image.
    path = visualize_pruning(model, processor, Image.new("RGB", (96, 48)), tmp_path / "x.png", panel_height=64)
    with Image.open(path) as png:
        assert png.size == (64 + 2 * MARGIN, 64 + LEGEND_HEIGHT + 3 * MARGIN)


@pytest.mark.parametrize(
    ("count", "expected"),
    [(1, [0]), (5, [0, 1, 2, 3, 4]), (8, list(range(8))), (10, [0, 2, 4, 6, 9]), (11, [0, 2, 4, 6, 8, 10])],
)
def test_legend_ticks_keep_first_and_last_and_never_touch(count, expected):
    assert legend_ticks(count) == expected
