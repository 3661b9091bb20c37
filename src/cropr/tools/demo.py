"""What the interactive demo computes, without its web page: loading a checkpoint at other pruning rates, reading
images safely, and comparing one image with pruning off and on (predictions, heat-map, tokens per block, latency).

`cropr.tools.demo_app` puts these functions behind a Gradio page; everything here works without Gradio installed.
"""

from __future__ import annotations

import functools
import statistics
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoConfig, AutoImageProcessor

from ..data.images import SAMPLE_PHOTOS, sample_photo, to_rgb
from ..models.cropr_vit import modeling_cropr_vit
from ..models.cropr_vit.configuration_cropr_vit import CroprViTConfig
from ..models.cropr_vit.modeling_cropr_vit import CroprViTPreTrainedModel
from .timing import interleaved_timings
from .visualization import drop_block_map, model_view, panel_size, render_pruning_heatmap

DEFAULT_CHECKPOINT = "outputs/first-run/model"
"""The checkpoint the demo opens when none is given: where the README's first command (`make main`) saves its model."""

MAX_IMAGE_PIXELS = 50_000_000
"""Largest image the demo reads (width x height); the header is checked before any pixel is decoded."""
WORKING_SIDE = 1024
"""Images are scaled down to at most this many pixels on their longer side as soon as they are read: the model sees
its own input size, and the heat-map needs no more."""
DISPLAY_HEIGHT = 320
"""Height in pixels of the heat-map and mask panels."""
TOP_K = 5
"""Classes shown per classification prediction."""
VARIANT_CACHE_SIZE = 3
"""Models at other pruning rates kept in memory (each a full copy of the weights), so that moving the slider back and
forth does not reload them."""

NUM_SCENE_EXAMPLES = 2
"""Built-in scenes (validation split of the checkpoint's built-in task) offered as examples."""
SCENE_PREFIX = "built-in scene "

# The task head each architecture has, and the built-in scenes that match it.
TASKS = {
    "CroprViTForImageClassification": ("classification", "cluttered-classification"),
    "CroprViTForMultiLabelClassification": ("multi-label", "multi-label"),
    "CroprViTForSemanticSegmentation": ("segmentation", "segmentation"),
}


class DemoError(Exception):
    """An expected problem with the user's input (image, checkpoint, pruning rate), shown as a message on the page."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------
class DemoCheckpoint:
    """A CroprViT task checkpoint with its image processor, ready to run with pruning off and at other rates.

    The pruning-off model is the trained one with the selector `"none"` (the same weights); a model at pruning rate
    R is `from_pretrained(source, pruning_rate=R)`, loaded on first use and cached.
    """

    def __init__(self, source: str):
        self.source = source
        folder = Path(source)
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise DemoError(f"{source!r} has no config.json: pass a folder written by `save_pretrained`, or a Hub id.")
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise DemoError(f"Cannot load {source!r} as a checkpoint: {_one_line(error)}") from None
        if not isinstance(config, CroprViTConfig):
            raise DemoError(
                f"{source!r} holds a {config.model_type!r} model, not a CroprViT one: convert backbone weights "
                "with `cropr convert` first."
            )
        architecture = (config.architectures or ["CroprViTModel"])[0]
        if architecture not in TASKS:
            raise DemoError(
                f"{source!r} is a {architecture}: the demo needs a classification, multi-label or segmentation "
                "head to show predictions."
            )
        self.task, self.scene_task = TASKS[architecture]
        self.model_class: type[CroprViTPreTrainedModel] = getattr(modeling_cropr_vit, architecture)
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise DemoError(
                f"{source!r} has no usable image processor (save it next to the model with "
                f"`image_processor.save_pretrained(folder)`): {_one_line(error)}"
            ) from None
        try:
            self.model = self.model_class.from_pretrained(source).eval()
            self.unpruned = self.model.with_token_selector("none").eval()
        except (OSError, ValueError) as error:
            raise DemoError(f"Cannot load the model of {source!r}: {_one_line(error)}") from None
        self._variants: OrderedDict[int, CroprViTPreTrainedModel] = OrderedDict()

    @property
    def config(self) -> CroprViTConfig:
        return self.model.config

    @property
    def trained_rate(self) -> int | None:
        """The pruning rate the checkpoint was saved with, or `None` when no per-block rate sets its schedule."""
        if self.config.pruning_rate_range() is None or self.config.pruning_schedule is not None:
            return None
        return self.config.pruning_rate

    def at_rate(self, rate: int | None) -> CroprViTPreTrainedModel:
        """The model pruning `rate` tokens after each block of `config.pruning_rate_range()` (`None`: the schedule the
        checkpoint was saved with); the loaded model itself where that rate runs its saved schedule."""
        if rate is None:
            return self.model
        allowed = self.config.pruning_rate_range()
        if allowed is None:
            schedule, missing = self.config.effective_pruning_schedule, self.config.blocks_lacking_rate_modules()
            if missing:
                raise DemoError(
                    f"{self.source!r} runs only its saved schedule ({schedule}): it has no Cropr module after blocks "
                    f"{missing}, where a pruning rate prunes."
                )
            raise DemoError(
                f"{self.source!r} prunes with a fixed schedule ({schedule}); it has no pruning rate to change."
            )
        if not allowed[0] <= rate <= allowed[1]:
            raise DemoError(f"The pruning rate must be in {allowed[0]}..{allowed[1]} for this model, got {rate}.")
        if self.config.schedule_at_rate(rate) == self.config.effective_pruning_schedule:
            return self.model
        if rate not in self._variants:
            try:
                model = self.model_class.from_pretrained(self.source, pruning_rate=rate).eval()
            except (OSError, ValueError) as error:
                raise DemoError(f"Cannot run {self.source!r} at pruning rate {rate}: {_one_line(error)}") from None
            self._variants[rate] = model
            if len(self._variants) > VARIANT_CACHE_SIZE:
                self._variants.popitem(last=False)
        self._variants.move_to_end(rate)
        return self._variants[rate]

    def describe(self) -> str:
        """One line about the checkpoint: task, shape and the schedule it was trained with."""
        config = self.config
        height, width = config.image_size_hw
        rate = self.trained_rate
        schedule = f"R={rate} per block" if rate is not None else f"schedule {config.effective_pruning_schedule}"
        return (
            f"{self.model_class.__name__} ({self.task}, {config.num_labels} classes), {height}x{width} input, "
            f"{config.num_patches} patches, {config.num_hidden_layers} blocks of width {config.hidden_size}; "
            f"trained with {schedule}, selector {config.token_selector!r}"
            f"{', Last Layer Fusion' if config.last_layer_fusion else ''}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------
def load_image(path: str | Path) -> Image.Image:
    """Read an uploaded image as RGB, upright (EXIF orientation), at most `WORKING_SIDE` pixels on its longer side.

    Raises:
        DemoError: the file is missing, not an image Pillow reads, larger than `MAX_IMAGE_PIXELS`, or damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise DemoError(f"{path.name} is not a file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked right below
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DemoError(_too_large(path.name, width, height))
                opened.draft("RGB", (WORKING_SIDE, WORKING_SIDE))  # JPEG: decode at a reduced scale
                image = to_rgb(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError:
        raise DemoError(_too_large(path.name)) from None
    except UnidentifiedImageError:
        raise DemoError(f"{path.name} is not an image file (PNG, JPEG, WebP, ... are read).") from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data, unconvertible pixel values
        raise DemoError(f"{path.name} could not be read as an image: {_one_line(error)}") from None
    image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BICUBIC)
    return image


def _too_large(name: str, width: int | None = None, height: int | None = None) -> str:
    size = f" ({width}x{height}, {width * height / 1e6:.0f} megapixels)" if width else ""
    return f"{name}{size} is too large: the demo reads images up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels."


def example_names(checkpoint: DemoCheckpoint) -> list[str]:
    """The built-in examples for `checkpoint`: scikit-image's photos (when installed) and scenes of its task."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        photos = []
    else:
        photos = list(SAMPLE_PHOTOS)
    return photos + [f"{SCENE_PREFIX}{index + 1}" for index in range(NUM_SCENE_EXAMPLES)]


def example_image(name: str, checkpoint: DemoCheckpoint) -> Image.Image:
    """The image of a built-in example named by `example_names`."""
    if name in SAMPLE_PHOTOS:
        return sample_photo(name)
    if name.startswith(SCENE_PREFIX) and name[len(SCENE_PREFIX) :].isdigit():
        index = int(name[len(SCENE_PREFIX) :]) - 1
        if 0 <= index < NUM_SCENE_EXAMPLES:
            size = max(checkpoint.config.image_size_hw)
            return _scenes(checkpoint.scene_task, size)[index]
    raise DemoError(f"There is no built-in example {name!r}.")


@functools.lru_cache(maxsize=4)
def _scenes(task: str, size: int) -> tuple[Image.Image, ...]:
    from ..data.scenes import load_builtin_task, min_image_size

    dataset = load_builtin_task(
        task, num_train=1, num_eval=NUM_SCENE_EXAMPLES, image_size=max(size, min_image_size(task)), source="subset"
    )
    return tuple(to_rgb(image) for image in dataset["validation"]["image"])


# ----------------------------------------------------------------------------------------------------------------------
# One comparison
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Everything the page shows for one image at one pruning rate.

    `off` and `on` are the predictions with pruning off and on: `{class name: score}` of the top `TOP_K` classes
    (softmax, or sigmoid for multi-label) or, for segmentation, an `(H, W)` array of class ids at the size of
    `image`. `latency_ms` holds the median milliseconds per call of each.
    """

    image: Image.Image
    heatmap: Image.Image
    off: dict[str, float] | np.ndarray
    on: dict[str, float] | np.ndarray
    token_counts_off: list[int]
    token_counts_on: list[int]
    latency_ms: dict[str, float]
    rate: int | None
    flop_ceiling: float


def top_classes(logits: torch.Tensor, config: CroprViTConfig, k: int = TOP_K) -> dict[str, float]:
    """`{class name: score}` of the `k` highest-scoring classes of one image's `logits` (sigmoid for multi-label)."""
    multi_label = config.problem_type == "multi_label_classification"
    scores = logits.float().sigmoid() if multi_label else logits.float().softmax(-1)
    values, indices = scores.topk(min(k, scores.numel()))
    return {config.id2label.get(int(i), str(int(i))): float(v) for v, i in zip(values, indices, strict=True)}


def segmentation_mask(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Class ids `(height, width)` of one image's patch logits `(num_labels, h, w)` upsampled to `size` (w, h)."""
    upsampled = F.interpolate(logits[None].float(), size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return upsampled[0].argmax(0).cpu().numpy()


def mask_annotations(mask: np.ndarray, id2label: dict[int, str]) -> list[tuple[np.ndarray, str]]:
    """`(boolean mask, class name)` for each class present in `mask`, largest first."""
    classes, counts = np.unique(mask, return_counts=True)
    return [(mask == label, id2label.get(int(label), str(int(label)))) for label in classes[np.argsort(-counts)]]


@torch.inference_mode()
def compare(
    checkpoint: DemoCheckpoint, image: Image.Image, rate: int | None, workdir: str | Path, repeats: int = 5
) -> Comparison:
    """Run `image` through the checkpoint with pruning off and at pruning `rate`, and time both.

    Latency is the median of `repeats` timed calls of each model (batch of one, after one warm-up call), measured
    interleaved on this machine (`cropr.tools.timing.interleaved_timings`). The heat-map PNG is written into
    `workdir` and removed once read.
    """
    pruned = checkpoint.at_rate(rate)
    config = pruned.config
    pixel_values = checkpoint.image_processor(images=image, return_tensors="pt")["pixel_values"]
    off = checkpoint.unpruned(pixel_values=pixel_values)
    on = pruned(pixel_values=pixel_values, output_kept_indices=True)

    # The part of the image the model sees (its center crop, for processors that crop): the patches line up with it.
    shown = model_view(checkpoint.image_processor, image)
    shown = shown.resize(panel_size(shown.size, DISPLAY_HEIGHT), Image.Resampling.BICUBIC)
    if checkpoint.task == "segmentation":
        predictions = [segmentation_mask(output.logits[0], shown.size) for output in (off, on)]
    else:
        predictions = [top_classes(output.logits[0], config) for output in (off, on)]

    patch_h, patch_w = config.patch_size_hw
    grid = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
    kept = [indices[0] for indices in on.kept_indices or ()]
    drop_map = drop_block_map(kept, config.pruning_blocks, grid, config.num_prefix_tokens)
    path = Path(workdir) / f"heatmap-{uuid.uuid4().hex}.png"
    try:
        render_pruning_heatmap(shown, drop_map, config.pruning_blocks, path, panel_height=DISPLAY_HEIGHT)
        with Image.open(path) as rendered:
            heatmap = rendered.convert("RGB")
    finally:
        path.unlink(missing_ok=True)

    steps = {"off": lambda: checkpoint.unpruned(pixel_values), "on": lambda: pruned(pixel_values)}
    samples = interleaved_timings(steps, pixel_values.device, warmup=1, repeats=repeats)
    return Comparison(
        image=shown,
        heatmap=heatmap,
        off=predictions[0],
        on=predictions[1],
        token_counts_off=checkpoint.unpruned.config.token_counts(pruned=False),
        token_counts_on=config.token_counts(),
        latency_ms={name: statistics.median(values) * 1e3 for name, values in samples.items()},
        rate=rate if rate is not None else checkpoint.trained_rate,
        flop_ceiling=config.flop_ceiling(),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Text shown on the page
# ----------------------------------------------------------------------------------------------------------------------
BAR_WIDTH = 24


def tokens_table(comparison: Comparison) -> str:
    """Markdown table of the tokens each block sees with pruning off and on, with a bar per block."""
    most = max(comparison.token_counts_off)
    rows = ["| block | tokens, pruning off | tokens, pruning on | |", "|---:|---:|---:|:---|"]
    for block, (off, on) in enumerate(zip(comparison.token_counts_off, comparison.token_counts_on, strict=True)):
        bar = "█" * max(1, round(BAR_WIDTH * on / most))
        rows.append(f"| {block} | {off} | {on} | {bar} |")
    return "\n".join(rows)


def latency_summary(comparison: Comparison, repeats: int) -> str:
    """Markdown: measured latency of both models, the speed-up, and the FLOP ceiling it compares to."""
    off, on = comparison.latency_ms["off"], comparison.latency_ms["on"]
    rate = "its fixed schedule" if comparison.rate is None else f"R = {comparison.rate}"
    return (
        f"**Latency on this machine** (median of {repeats} timed calls, batch 1, {torch.get_num_threads()} "
        f"thread(s)): pruning off **{off:.1f} ms**, pruning on ({rate}) **{on:.1f} ms**: **{off / on:.2f}x** "
        f"(FLOP ceiling {comparison.flop_ceiling:.2f}x)."
    )


__all__ = [
    "DEFAULT_CHECKPOINT",
    "MAX_IMAGE_PIXELS",
    "Comparison",
    "DemoCheckpoint",
    "DemoError",
    "compare",
    "example_image",
    "example_names",
    "latency_summary",
    "load_image",
    "mask_annotations",
    "segmentation_mask",
    "tokens_table",
    "top_classes",
]
