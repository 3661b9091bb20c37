"""Pruning heat-maps: where each patch left a CroprViT (the Token Cropr paper's Figure 1).

`drop_block_map` turns a model's `kept_indices` into a per-patch map of the block after which each patch was set aside;
`render_pruning_heatmap` draws that map over the image (and, for segmentation models, the predicted mask as a second
panel); `visualize_pruning` does both for a model, its image processor and one image. Rendering uses only Pillow.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension

from ..data.images import to_rgb

NEVER_DROPPED = -1
"""`drop_block_map` value of the patches that every pruning module kept."""

PANEL_HEIGHT = 384
"""Default height in pixels of each panel (the image is scaled to it, keeping its aspect ratio)."""
MAX_PANEL_SIDE = 4096
"""Largest panel height and width in pixels: a taller `panel_height` is refused, and an image too wide for the
requested height is drawn at this width instead (and so less high), which bounds the memory a heat-map takes."""
MARGIN = 12
"""Space in pixels around and between the panels and the legend."""
LEGEND_HEIGHT = 64
"""Height in pixels of the legend strip under the panels."""
OVERLAY_ALPHA = 0.6
"""Opacity of the colour laid over dropped patches and over the predicted mask."""

# Viridis at 9 evenly spaced points: dark purple = dropped early, yellow = dropped late.
_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 45, 123),
        (59, 82, 139),
        (44, 114, 142),
        (33, 145, 140),
        (40, 174, 128),
        (94, 201, 98),
        (173, 220, 48),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_KEPT_OUTLINE = (255, 255, 255)


def _to_index_array(indices: torch.Tensor | np.ndarray | Sequence[int], module: int) -> np.ndarray:
    array = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    if array.ndim != 1:
        raise ValueError(
            f"kept_indices[{module}] must be 1-D (the kept positions of one image), got shape {array.shape}: "
            "select one sample, e.g. `[indices[0] for indices in outputs.kept_indices]`."
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"kept_indices[{module}] must hold integer token positions, got dtype {array.dtype}.")
    return array.astype(np.int64)


def drop_block_map(
    kept_indices: Sequence[torch.Tensor | np.ndarray | Sequence[int]],
    pruning_blocks: Sequence[int],
    grid: tuple[int, int],
    num_prefix_tokens: int,
) -> np.ndarray:
    """Per patch, the index of the block after which it was dropped (`NEVER_DROPPED` if every module kept it).

    Args:
        kept_indices: for each pruning module (in the order of `pruning_blocks`), the original token positions it kept
            for one image; positions `0 .. num_prefix_tokens - 1` are prefix tokens (CLS), patches follow in raster
            order. This is `[indices[i] for indices in outputs.kept_indices]` for sample `i` of a CroprViT output.
        pruning_blocks: the block index after which each module runs (`config.pruning_blocks`).
        grid: patches along height and width of the input.
        num_prefix_tokens: prefix tokens before the patches (`config.num_prefix_tokens`).

    Returns:
        An int64 array of shape `grid`: block indices (0-based, as in `config.pruning_blocks`) or `NEVER_DROPPED`.

    Raises:
        ValueError: when the lists disagree in length, a position is out of range, or a module keeps a token that an
            earlier module had already dropped.
    """
    if len(kept_indices) != len(pruning_blocks):
        raise ValueError(
            f"Got kept indices of {len(kept_indices)} pruning modules but {len(pruning_blocks)} pruning blocks "
            f"{list(pruning_blocks)}."
        )
    grid_h, grid_w = grid
    num_tokens = num_prefix_tokens + grid_h * grid_w
    drop_block = np.full(num_tokens, NEVER_DROPPED, dtype=np.int64)
    alive = np.ones(num_tokens, dtype=bool)
    for module, (indices, block) in enumerate(zip(kept_indices, pruning_blocks, strict=True)):
        kept = _to_index_array(indices, module)
        if kept.size and (kept.min() < 0 or kept.max() >= num_tokens):
            raise ValueError(
                f"kept_indices[{module}] has positions in [{kept.min()}, {kept.max()}] but a {grid_h}x{grid_w} grid "
                f"with {num_prefix_tokens} prefix token(s) has positions 0..{num_tokens - 1}."
            )
        kept_mask = np.zeros(num_tokens, dtype=bool)
        kept_mask[kept] = True
        revived = kept_mask & ~alive
        if revived.any():
            raise ValueError(
                f"kept_indices[{module}] (after block {block}) keeps positions {np.flatnonzero(revived).tolist()} "
                "that an earlier module had already dropped."
            )
        drop_block[alive & ~kept_mask] = block
        alive = kept_mask
    return drop_block[num_prefix_tokens:].reshape(grid_h, grid_w)


def block_colors(pruning_blocks: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """One colour per pruning block, from dark purple (first) to yellow (last), on the viridis scale."""
    count = len(pruning_blocks)
    colors = {}
    for rank, block in enumerate(pruning_blocks):
        position = rank / (count - 1) if count > 1 else 0.0
        colors[block] = _viridis(position)
    return colors


def _viridis(position: float) -> tuple[int, int, int]:
    scaled = position * (len(_VIRIDIS) - 1)
    low = min(int(scaled), len(_VIRIDIS) - 2)
    weight = scaled - low
    color = (1 - weight) * _VIRIDIS[low] + weight * _VIRIDIS[low + 1]
    return tuple(int(round(channel)) for channel in color)


def class_colors(num_classes: int) -> np.ndarray:
    """A fixed, well-spread palette of `num_classes` RGB colours (uint8, shape `(num_classes, 3)`)."""
    golden = 0.618033988749895
    colors = [
        colorsys.hsv_to_rgb((index * golden) % 1.0, 0.75, 0.95 - 0.25 * (index % 2)) for index in range(num_classes)
    ]
    return (np.array(colors) * 255).round().astype(np.uint8).reshape(num_classes, 3)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def panel_size(image_size: tuple[int, int], panel_height: int = PANEL_HEIGHT) -> tuple[int, int]:
    """The `(width, height)` an image of `image_size` (width, height) is drawn at in each panel.

    The image is scaled to `panel_height`, keeping its aspect ratio, unless that makes it wider than `MAX_PANEL_SIDE`:
    then it is scaled to that width instead.

    Raises:
        ValueError: when `panel_height` is not in `1 .. MAX_PANEL_SIDE`.
    """
    if not 1 <= panel_height <= MAX_PANEL_SIDE:
        raise ValueError(f"`panel_height` must be in 1..{MAX_PANEL_SIDE}, got {panel_height}.")
    width, height = image_size
    scaled_width = round(width * panel_height / height)
    if scaled_width > MAX_PANEL_SIDE:
        return MAX_PANEL_SIDE, max(1, round(height * MAX_PANEL_SIDE / width))
    return max(1, scaled_width), panel_height


def _heatmap_panel(image: Image.Image, drop_map: np.ndarray, colors: Mapping[int, tuple[int, int, int]]) -> Image.Image:
    """Tint dropped patches by block and outline the region of kept-to-the-end patches (drawn at display size)."""
    width, height = image.size
    grid_h, grid_w = drop_map.shape
    overlay = np.zeros((grid_h, grid_w, 3), dtype=np.uint8)
    alpha = np.zeros((grid_h, grid_w), dtype=np.uint8)
    for block, color in colors.items():
        overlay[drop_map == block] = color
        alpha[drop_map == block] = round(255 * OVERLAY_ALPHA)
    overlay_image = Image.fromarray(overlay).resize((width, height), Image.Resampling.NEAREST)
    alpha_image = Image.fromarray(alpha).resize((width, height), Image.Resampling.NEAREST)
    panel = Image.composite(overlay_image, image, alpha_image)
    kept = np.pad(drop_map == NEVER_DROPPED, 1)
    x_edges = np.linspace(0, width - 1, grid_w + 1).round()
    y_edges = np.linspace(0, height - 1, grid_h + 1).round()
    draw = ImageDraw.Draw(panel)
    for row, col in zip(*np.nonzero(kept[1:-1, 1:-1]), strict=True):
        left, right, top, bottom = x_edges[col], x_edges[col + 1], y_edges[row], y_edges[row + 1]
        if not kept[row, col + 1]:
            draw.line((left, top, right, top), fill=_KEPT_OUTLINE, width=2)
        if not kept[row + 2, col + 1]:
            draw.line((left, bottom, right, bottom), fill=_KEPT_OUTLINE, width=2)
        if not kept[row + 1, col]:
            draw.line((left, top, left, bottom), fill=_KEPT_OUTLINE, width=2)
        if not kept[row + 1, col + 2]:
            draw.line((right, top, right, bottom), fill=_KEPT_OUTLINE, width=2)
    return panel


def _mask_panel(image: Image.Image, mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    colored = Image.fromarray(palette[mask]).resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image, colored, OVERLAY_ALPHA)


def legend_ticks(count: int, most: int = 8) -> list[int]:
    """Which of `count` colour-bar cells get a number: about `most` of them, first and last included, evenly spaced
    and never adjacent when some are skipped (so one-digit labels do not run together)."""
    stride = max(1, -(-count // most))
    ticks = list(range(0, count, stride))
    if ticks[-1] != count - 1:
        if len(ticks) > 1 and count - 1 - ticks[-1] < stride:
            ticks[-1] = count - 1
        else:
            ticks.append(count - 1)
    return ticks


def _draw_heatmap_legend(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colors: Mapping[int, tuple[int, int, int]]
) -> None:
    left, top, right, _ = box
    font = _font(13)
    draw.text((left, top), "dropped after block:", fill=_TEXT, font=font)
    kept_label = "kept to the end"
    kept_width = round(draw.textlength(kept_label, font=font)) + 22
    bar_left, bar_right = left, max(left + 1, right - kept_width - MARGIN)
    bar_top, bar_bottom = top + 18, top + 34
    blocks = list(colors)
    if blocks:
        step = (bar_right - bar_left) / len(blocks)
        for rank, block in enumerate(blocks):
            draw.rectangle(
                (bar_left + rank * step, bar_top, bar_left + (rank + 1) * step, bar_bottom), fill=colors[block]
            )
        for rank in legend_ticks(len(blocks)):
            label = str(blocks[rank])
            center = bar_left + (rank + 0.5) * step
            draw.text((center - draw.textlength(label, font=font) / 2, bar_bottom + 2), label, fill=_TEXT, font=font)
    else:
        draw.text((bar_left, bar_top), "(no pruning module)", fill=_TEXT, font=font)
    swatch_left = right - kept_width + 4
    draw.rectangle((swatch_left, bar_top, swatch_left + 16, bar_bottom), fill=(128, 128, 128), outline=_KEPT_OUTLINE)
    draw.text((swatch_left + 22, bar_top), kept_label, fill=_TEXT, font=font)


def _draw_mask_legend(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    mask: np.ndarray,
    palette: np.ndarray,
    id2label: Mapping[int, str] | None,
) -> None:
    left, top, right, _ = box
    font = _font(13)
    draw.text((left, top), "predicted classes (largest first):", fill=_TEXT, font=font)
    classes, counts = np.unique(mask, return_counts=True)
    x, y = left, top + 18
    for label_id in classes[np.argsort(-counts)]:
        name = (id2label or {}).get(int(label_id), str(int(label_id)))
        width = 20 + round(draw.textlength(name, font=font)) + MARGIN
        if x + width > right:
            if y > top + 18:
                draw.text((x, y), "...", fill=_TEXT, font=font)
                break
            x, y = left, y + 20
        draw.rectangle((x, y, x + 16, y + 16), fill=tuple(int(c) for c in palette[label_id]), outline=_TEXT)
        draw.text((x + 20, y), name, fill=_TEXT, font=font)
        x += width


def render_pruning_heatmap(
    image: Image.Image,
    drop_map: np.ndarray,
    pruning_blocks: Sequence[int],
    path: str | Path,
    *,
    segmentation_mask: np.ndarray | None = None,
    id2label: Mapping[int, str] | None = None,
    panel_height: int = PANEL_HEIGHT,
) -> Path:
    """Draw the image with each patch tinted by the block after which it was dropped, and write it as a PNG.

    Patches kept to the end are left untinted and outlined in white. With `segmentation_mask` (an `(H, W)` array of
    class ids at the image's size) a second panel shows the mask over the image. The PNG is
    `n * width + (n + 1) * MARGIN` wide and `height + LEGEND_HEIGHT + 3 * MARGIN` high for `n` panels, where
    `(width, height)` is `panel_size(image.size, panel_height)`: the image scaled to `panel_height`, or to
    `MAX_PANEL_SIDE` wide if it would be wider.

    Args:
        image: the input image (any mode; drawn as RGB, 16- and 32-bit integer images scaled to 8 bits).
        drop_map: output of `drop_block_map` (patch grid over the whole image).
        pruning_blocks: the model's pruning blocks, which fix the colour scale (`config.pruning_blocks`).
        path: where to write the PNG (parent folders are created).
        segmentation_mask: optional predicted class ids, shape `(image height, image width)`.
        id2label: class names for the mask legend (`config.id2label`).
        panel_height: height of each panel in pixels, at most `MAX_PANEL_SIDE`.

    Returns:
        The path written.
    """
    if drop_map.ndim != 2:
        raise ValueError(f"`drop_map` must be 2-D (patch grid), got shape {drop_map.shape}.")
    unknown = sorted(set(np.unique(drop_map).tolist()) - {*pruning_blocks, NEVER_DROPPED})
    if unknown:
        raise ValueError(f"`drop_map` holds blocks {unknown} that are not pruning blocks {list(pruning_blocks)}.")
    panel_width, panel_height = panel_size(image.size, panel_height)
    image = to_rgb(image)
    if segmentation_mask is not None and segmentation_mask.shape != (image.height, image.width):
        raise ValueError(
            f"`segmentation_mask` has shape {segmentation_mask.shape}, expected the image's (height, width) "
            f"{(image.height, image.width)}."
        )

    colors = block_colors(pruning_blocks)
    shown = image.resize((panel_width, panel_height), Image.Resampling.BICUBIC)
    panels = [_heatmap_panel(shown, drop_map, colors)]
    palette = None
    if segmentation_mask is not None:
        palette = class_colors(int(segmentation_mask.max()) + 1)
        panels.append(_mask_panel(shown, segmentation_mask, palette))

    width = len(panels) * panel_width + (len(panels) + 1) * MARGIN
    height = panel_height + LEGEND_HEIGHT + 3 * MARGIN
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, panel in enumerate(panels):
        canvas.paste(panel, (MARGIN + index * (panel_width + MARGIN), MARGIN))
    legend_top = panel_height + 2 * MARGIN
    _draw_heatmap_legend(draw, (MARGIN, legend_top, MARGIN + panel_width, legend_top + LEGEND_HEIGHT), colors)
    if segmentation_mask is not None:
        left = 2 * MARGIN + panel_width
        box = (left, legend_top, left + panel_width, legend_top + LEGEND_HEIGHT)
        _draw_mask_legend(draw, box, segmentation_mask, palette, id2label)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def model_view(image_processor, image: Image.Image) -> Image.Image:
    """The part of `image` that `image_processor` gives the model, in the image's own pixels: the whole image when
    the processor only resizes, the region its center crop keeps when it crops (after resizing to `size`: a fixed
    height and width, or the shortest edge). Beyond the image's edges (a crop larger than the resized image) the
    region is black, as the processor pads.

    Raises:
        ValueError: for a center-cropping processor whose `size` is neither of those forms.
    """
    settings = image_processor.to_dict()
    if not settings.get("do_center_crop"):
        return image
    crop = settings["crop_size"]
    width, height = image.size
    resize = settings.get("size") or {}
    if not settings.get("do_resize"):
        resized = (height, width)
    elif resize.get("height") and resize.get("width"):
        resized = (resize["height"], resize["width"])
    elif resize.get("shortest_edge") and not resize.get("longest_edge"):
        # A zero-stride stand-in for the image: only its shape is read.
        shape_only = np.broadcast_to(np.uint8(0), (height, width, 3))
        resized = get_resize_output_image_size(
            shape_only, resize["shortest_edge"], default_to_square=False, input_data_format=ChannelDimension.LAST
        )
    else:
        raise ValueError(f"Cannot locate the center crop of an image processor resizing to {resize}.")
    # The crop's corner in the resized image, as transformers' `center_crop` places it, mapped back to the image.
    top, left = (resized[0] - crop["height"]) // 2, (resized[1] - crop["width"]) // 2
    scale_y, scale_x = height / resized[0], width / resized[1]
    box = (left * scale_x, top * scale_y, (left + crop["width"]) * scale_x, (top + crop["height"]) * scale_y)
    return image.crop(tuple(round(value) for value in box))


def visualize_pruning(
    model: torch.nn.Module,
    image_processor,
    image: str | Path | Image.Image,
    path: str | Path,
    *,
    panel_height: int = PANEL_HEIGHT,
) -> Path:
    """Run a CroprViT model on one image and write its pruning heat-map (plus predicted mask for segmentation).

    The patch grid is drawn over the part of the image the model sees ([`model_view`]): the whole image for
    processors that only resize, the center crop for those that crop (as converted DeiT, DINOv2 and CLIP
    classifiers do).

    Args:
        model: a `CroprViTModel` or task model (its outputs carry `kept_indices`).
        image_processor: the checkpoint's image processor.
        image: an image path or a PIL image (16- and 32-bit integer images are scaled to 8 bits, as in `to_rgb`).
        path: where to write the PNG.
        panel_height: height of each panel in pixels, at most `MAX_PANEL_SIDE` (see `panel_size`).

    Returns:
        The path written.
    """
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            image = to_rgb(opened)
    else:
        image = to_rgb(image)
    shown = model_view(image_processor, image)
    shown_size = panel_size(shown.size, panel_height)
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
    config = model.config
    parameter = next(model.parameters())
    model.eval()
    with torch.no_grad():
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        outputs = model(pixel_values=pixel_values, output_kept_indices=True, return_dict=True)
    if outputs.kept_indices is None:
        raise ValueError(f"{type(model).__name__} outputs no `kept_indices`: pass a CroprViT model.")
    patch_h, patch_w = config.patch_size_hw
    grid = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
    drop_map = drop_block_map(
        [indices[0] for indices in outputs.kept_indices], config.pruning_blocks, grid, config.num_prefix_tokens
    )
    # Everything from here on is at panel size: a mask at the size of a large image would take `num_labels` floats
    # per pixel.
    shown = shown.resize(shown_size, Image.Resampling.BICUBIC)
    mask = None
    logits = getattr(outputs, "logits", None)
    if logits is not None and logits.dim() == 4:
        upsampled = F.interpolate(logits[:1].float(), size=(shown.height, shown.width), mode="bilinear")
        mask = upsampled.argmax(dim=1)[0].cpu().numpy()
    return render_pruning_heatmap(
        shown,
        drop_map,
        config.pruning_blocks,
        path,
        segmentation_mask=mask,
        id2label=config.id2label if mask is not None else None,
        panel_height=panel_height,
    )


__all__ = [
    "LEGEND_HEIGHT",
    "MARGIN",
    "MAX_PANEL_SIDE",
    "NEVER_DROPPED",
    "PANEL_HEIGHT",
    "block_colors",
    "class_colors",
    "drop_block_map",
    "legend_ticks",
    "model_view",
    "panel_size",
    "render_pruning_heatmap",
    "visualize_pruning",
]
