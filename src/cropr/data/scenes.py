"""Built-in tasks made of real Fashion-MNIST garments placed on larger canvases, so that most patches are background.

Three tasks, each deterministic given its seed, returned as `datasets` objects with standard features:

- `"cluttered-classification"`: one garment at a random position and scale, plus small fragments of garments of
  other classes as clutter; features `image` (RGB) and `label` (`ClassLabel`, the 10 Fashion-MNIST classes).
- `"multi-label"`: 2 to 4 garments of distinct classes, one per cell of a 2x2 grid (random cells, scales and
  positions inside them, so they never overlap); features `image` and `labels` (10 floats, multi-hot).
- `"segmentation"`: the same scenes as `"multi-label"` (for the same seed and split), with `label` a per-pixel
  class map (a mode "L" image): 0 for background, `class_id + 1` where a garment pixel is brighter than
  [`MASK_THRESHOLD`]; 11 classes in all.
- `"detection"`: the same scenes again, in the COCO-style layout of transformers' object-detection examples:
  `image`, `image_id`, `width`, `height` and `objects` (`id`, `area`, `bbox` as COCO `[x, y, width, height]` in
  pixels, the garment's tight box over its mask pixels, `category` a `ClassLabel` of the 10 classes), plus
  `instance_mask` (mode "L": 0 for background, `k + 1` on the mask pixels of the k-th object); `area` is the mask's
  pixel count, as in COCO.

Every canvas has faint uniform noise (at most [`NOISE_MAX`], below `MASK_THRESHOLD`) and each garment a random tint
whose brightest channel is full, so a pixel labelled as garment is brighter than any noise in at least one channel.
Training scenes use only the original training images and evaluation scenes only the original test images.

Example:

```python
from cropr.data import load_builtin_task, id2label

dataset = load_builtin_task("segmentation", num_train=2000, num_eval=500)
labels = id2label("segmentation")  # {0: "background", 1: "T-shirt/top", ...}
```
"""

from __future__ import annotations

import io
import logging
import operator
import os
from collections.abc import Callable

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, List, Sequence, Split, Value
from PIL import Image as PILImage

from .fashion_mnist import FASHION_MNIST_CLASSES, IMAGE_SIZE, NUM_CLASSES, load_fashion_mnist

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("cluttered-classification", "multi-label", "segmentation", "detection")
"""Names accepted by [`load_builtin_task`]."""

BACKGROUND = "background"
"""Name of label 0 in the segmentation task."""

NOISE_MAX = 24
"""Largest value of the background noise, per channel."""

MASK_THRESHOLD = 32
"""A garment pixel (after resizing, before tinting) above this value is labelled as garment in segmentation maps."""

MIN_GARMENT_SIZE = IMAGE_SIZE
"""Garments are never shrunk below their native 28 pixels, so they stay recognisable."""

_GRID = 2  # multi-object scenes use a 2x2 grid of cells, one garment per cell
MAX_OBJECTS = _GRID * _GRID
MIN_OBJECTS = 2
_NUM_DISTRACTORS = (3, 6)  # inclusive range of clutter fragments per classification scene
_FRAGMENT_SIZE = (6, 12)  # inclusive range of their side, in pixels: smaller than a 16-pixel patch
_FRAGMENT_MARGIN = 4  # fragments are cut away from the border of a 28x28 image, where it is mostly empty
_MIN_TINT = 0.3  # lowest value of a garment's two dimmer colour channels


def id2label(task: str) -> dict[int, str]:
    """Label names of a built-in task: the 10 Fashion-MNIST classes, plus `"background"` as 0 for segmentation."""
    _check_task(task)
    names = (BACKGROUND, *FASHION_MNIST_CLASSES) if task == "segmentation" else FASHION_MNIST_CLASSES
    return dict(enumerate(names))


def label2id(task: str) -> dict[str, int]:
    """Inverse of [`id2label`]."""
    return {name: index for index, name in id2label(task).items()}


def num_labels(task: str) -> int:
    """Number of labels of a built-in task (10, or 11 for segmentation)."""
    return len(id2label(task))


def task_features(task: str) -> Features:
    """The `datasets.Features` of a built-in task (see the module docstring)."""
    _check_task(task)
    if task == "cluttered-classification":
        return Features({"image": Image(), "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})
    if task == "multi-label":
        return Features({"image": Image(), "labels": Sequence(Value("float32"), length=NUM_CLASSES)})
    if task == "detection":
        objects = {
            "id": Value("int64"),
            "area": Value("float32"),
            "bbox": List(Value("float32"), length=4),
            "category": ClassLabel(names=list(FASHION_MNIST_CLASSES)),
        }
        return Features(
            {
                "image": Image(),
                "image_id": Value("int64"),
                "width": Value("int32"),
                "height": Value("int32"),
                "objects": List(objects),
                "instance_mask": Image(),
            }
        )
    return Features({"image": Image(), "label": Image()})


def min_image_size(task: str) -> int:
    """The smallest canvas a task accepts: one native garment, or a 2x2 grid of cells fitting one each."""
    _check_task(task)
    return MIN_GARMENT_SIZE if task == "cluttered-classification" else _GRID * MIN_GARMENT_SIZE


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}")
    return value


def _check_args(task: str, num_examples: int, image_size: int, seed: int, num_name: str = "num_examples") -> None:
    _check_task(task)
    _check_count(num_name, num_examples)
    _check_count("seed", seed, minimum=0)
    minimum = min_image_size(task)
    image_size = _check_count("image_size", image_size)
    if image_size < minimum:
        layout = "a garment" if task == "cluttered-classification" else f"a {_GRID}x{_GRID} grid of garments"
        raise ValueError(
            f"image_size={image_size} is too small for the {task} task: {layout} of at least {MIN_GARMENT_SIZE} "
            f"pixels needs image_size >= {minimum}"
        )


def _check_pool(images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Validate source images and labels; return the indices of each class's images."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (N, 28, 28); got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},); got {labels.shape}")
    by_class = [np.flatnonzero(labels == class_id) for class_id in range(NUM_CLASSES)]
    missing = [FASHION_MNIST_CLASSES[class_id] for class_id, indices in enumerate(by_class) if len(indices) == 0]
    if missing:
        raise ValueError(f"the source images lack the classes {missing}")
    return by_class


def _resize(garment: np.ndarray, size: int) -> np.ndarray:
    if size == IMAGE_SIZE:
        return garment
    return np.asarray(PILImage.fromarray(garment).resize((size, size), PILImage.Resampling.BILINEAR))


def _tint(rng: np.random.Generator) -> np.ndarray:
    """A random colour whose brightest channel is 1, so a tinted garment keeps its brightness in that channel."""
    tint = rng.uniform(_MIN_TINT, 1.0, size=3)
    tint[rng.integers(3)] = 1.0
    return tint


def _blank_canvas(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A float canvas of faint uniform noise, its level random per scene."""
    level = rng.integers(0, NOISE_MAX + 1)
    return rng.integers(0, level + 1, size=(image_size, image_size, 3)).astype(np.float32)


def _paste(canvas: np.ndarray, garment: np.ndarray, top: int, left: int, tint: np.ndarray) -> None:
    """Alpha-composite a grayscale garment (its intensity is its opacity, as on Fashion-MNIST's black ground)."""
    height, width = garment.shape
    alpha = garment[..., None].astype(np.float32) / 255.0
    region = canvas[top : top + height, left : left + width]
    region *= 1.0 - alpha
    region += alpha * (255.0 * tint).astype(np.float32)


def _encode(array: np.ndarray, image_format: str) -> dict[str, bytes | None]:
    """Encode an image the way `datasets.Image()` stores it, choosing the format for speed.

    Scene images are stored as BMP: their noise makes PNG encoding about ten times slower (over 1 ms per image),
    and BMP is as lossless. Label maps are mostly zeros, so PNG is both fast and compact for them.
    """
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format=image_format)
    return {"bytes": buffer.getvalue(), "path": None}


def _encode_canvas(canvas: np.ndarray) -> dict[str, bytes | None]:
    return _encode(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "BMP")


def _scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    # One generator per scene: scene i depends only on (seed, stream, i), so a larger dataset extends a smaller one.
    return np.random.default_rng([seed, stream, index])


def _render_cluttered(
    rng: np.random.Generator, images: np.ndarray, by_class: list[np.ndarray], image_size: int
) -> tuple[dict[str, bytes | None], int]:
    """One garment at a random scale and position over small fragments of garments of other classes."""
    class_id = int(rng.integers(NUM_CLASSES))
    garment = images[rng.choice(by_class[class_id])]
    canvas = _blank_canvas(rng, image_size)
    for _ in range(rng.integers(_NUM_DISTRACTORS[0], _NUM_DISTRACTORS[1] + 1)):
        other_class = (class_id + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES
        size = int(rng.integers(_FRAGMENT_SIZE[0], _FRAGMENT_SIZE[1] + 1))
        row, col = rng.integers(_FRAGMENT_MARGIN, IMAGE_SIZE - _FRAGMENT_MARGIN - size + 1, size=2)
        fragment = images[rng.choice(by_class[other_class])][row : row + size, col : col + size]
        top, left = rng.integers(0, image_size - size + 1, size=2)
        _paste(canvas, fragment, top, left, _tint(rng))
    size = int(rng.integers(MIN_GARMENT_SIZE, max(MIN_GARMENT_SIZE, image_size // 2) + 1))
    top, left = rng.integers(0, image_size - size + 1, size=2)
    _paste(canvas, _resize(garment, size), top, left, _tint(rng))
    return _encode_canvas(canvas), class_id


def _render_multi_object(
    rng: np.random.Generator, images: np.ndarray, by_class: list[np.ndarray], image_size: int
) -> tuple[dict[str, bytes | None], np.ndarray, np.ndarray, np.ndarray]:
    """2 to 4 garments of distinct classes in distinct cells of a 2x2 grid; returns the image, the class ids in
    drawing order, the label map (`class_id + 1` per garment pixel) and the instance map (`k + 1` for the k-th)."""
    num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    class_ids = rng.choice(NUM_CLASSES, size=num_objects, replace=False)
    cells = rng.choice(_GRID * _GRID, size=num_objects, replace=False)
    cell_size = image_size // _GRID
    canvas = _blank_canvas(rng, image_size)
    label_map = np.zeros((image_size, image_size), dtype=np.uint8)
    instance_map = np.zeros((image_size, image_size), dtype=np.uint8)
    for instance, (class_id, cell) in enumerate(zip(class_ids, cells, strict=True)):
        garment = images[rng.choice(by_class[class_id])]
        size = int(rng.integers(MIN_GARMENT_SIZE, cell_size + 1))
        offset_top, offset_left = rng.integers(0, cell_size - size + 1, size=2)
        top, left = (cell // _GRID) * cell_size + offset_top, (cell % _GRID) * cell_size + offset_left
        garment = _resize(garment, size)
        _paste(canvas, garment, top, left, _tint(rng))
        label_map[top : top + size, left : left + size][garment > MASK_THRESHOLD] = class_id + 1
        instance_map[top : top + size, left : left + size][garment > MASK_THRESHOLD] = instance + 1
    return _encode_canvas(canvas), class_ids, label_map, instance_map


def _build(
    task: str,
    render: Callable[[np.random.Generator], dict],
    num_examples: int,
    seed: int,
    stream: int,
    split: str | None,
    description: str,
) -> Dataset:
    columns: dict[str, list] = {}
    for index in range(num_examples):
        for key, value in render(_scene_rng(seed, stream, index)).items():
            columns.setdefault(key, []).append(value)
    features = task_features(task)
    return Dataset.from_dict(
        columns, features=features, info=DatasetInfo(description=description, features=features), split=split
    )


def build_cluttered_classification(
    images: np.ndarray,
    labels: np.ndarray,
    num_examples: int,
    image_size: int = 112,
    seed: int = 0,
    *,
    stream: int = 0,
    split: str | None = None,
) -> Dataset:
    """Scenes of one garment, at a random scale (28 pixels to half the canvas) and position, among clutter.

    Args:
        images (`np.ndarray` of shape `(N, 28, 28)`, `uint8`): source garments, all from one original split.
        labels (`np.ndarray` of shape `(N,)`): their class ids; every class must occur.
        num_examples: number of scenes.
        image_size: side of the square canvas, at least 28.
        seed: the random seed; scene `i` depends only on `(seed, stream, i)`.
        stream: selects an independent random stream, e.g. 0 for training and 1 for evaluation scenes.
        split: the `datasets` split name to record.

    Returns:
        A `Dataset` with features `image` (PIL RGB) and `label` (`ClassLabel` of the 10 classes).
    """
    _check_args("cluttered-classification", num_examples, image_size, seed)
    by_class = _check_pool(images, labels)

    def render(rng: np.random.Generator) -> dict:
        image, class_id = _render_cluttered(rng, images, by_class, image_size)
        return {"image": image, "label": class_id}

    description = f"cropr cluttered Fashion-MNIST classification, {image_size}x{image_size}, seed {seed}"
    return _build("cluttered-classification", render, num_examples, seed, stream, split, description)


def build_multi_label(
    images: np.ndarray,
    labels: np.ndarray,
    num_examples: int,
    image_size: int = 112,
    seed: int = 0,
    *,
    stream: int = 0,
    split: str | None = None,
) -> Dataset:
    """Scenes of 2 to 4 garments of distinct classes, one per cell of a 2x2 grid, labelled multi-hot.

    Arguments as for [`build_cluttered_classification`]; `image_size` must be at least 56.

    Returns:
        A `Dataset` with features `image` (PIL RGB) and `labels` (10 floats: 1.0 for each class present, else 0.0).
    """
    _check_args("multi-label", num_examples, image_size, seed)
    by_class = _check_pool(images, labels)

    def render(rng: np.random.Generator) -> dict:
        image, class_ids, _, _ = _render_multi_object(rng, images, by_class, image_size)
        multi_hot = np.zeros(NUM_CLASSES, dtype=np.float32)
        multi_hot[class_ids] = 1.0
        return {"image": image, "labels": multi_hot.tolist()}

    description = f"cropr multi-label Fashion-MNIST scenes, {image_size}x{image_size}, seed {seed}"
    return _build("multi-label", render, num_examples, seed, stream, split, description)


def build_segmentation(
    images: np.ndarray,
    labels: np.ndarray,
    num_examples: int,
    image_size: int = 112,
    seed: int = 0,
    *,
    stream: int = 0,
    split: str | None = None,
) -> Dataset:
    """The scenes of [`build_multi_label`] (same arguments give the same images), with per-pixel class maps.

    Arguments as for [`build_cluttered_classification`]; `image_size` must be at least 56.

    Returns:
        A `Dataset` with features `image` (PIL RGB) and `label` (PIL mode "L": 0 background, `class_id + 1` on
        the garment's pixels brighter than [`MASK_THRESHOLD`]); see [`id2label`] for the 11 names.
    """
    _check_args("segmentation", num_examples, image_size, seed)
    by_class = _check_pool(images, labels)

    def render(rng: np.random.Generator) -> dict:
        image, _, label_map, _ = _render_multi_object(rng, images, by_class, image_size)
        return {"image": image, "label": _encode(label_map, "PNG")}

    description = f"cropr Fashion-MNIST segmentation scenes, {image_size}x{image_size}, seed {seed}"
    return _build("segmentation", render, num_examples, seed, stream, split, description)


def _objects(class_ids: np.ndarray, instance_map: np.ndarray, image_id: int) -> list[dict]:
    """COCO-style annotations of the garments of one scene (a garment without mask pixels has none)."""
    objects = []
    for instance, class_id in enumerate(class_ids):
        rows, columns = np.nonzero(instance_map == instance + 1)
        if len(rows) == 0:
            continue
        left, top = int(columns.min()), int(rows.min())
        bbox = [left, top, int(columns.max()) + 1 - left, int(rows.max()) + 1 - top]
        objects.append(
            {"id": image_id * MAX_OBJECTS + instance, "area": float(len(rows)), "bbox": bbox, "category": int(class_id)}
        )
    return objects


def build_detection(
    images: np.ndarray,
    labels: np.ndarray,
    num_examples: int,
    image_size: int = 112,
    seed: int = 0,
    *,
    stream: int = 0,
    split: str | None = None,
) -> Dataset:
    """The scenes of [`build_multi_label`] (same arguments give the same images), with each garment's box, class and
    instance mask in the COCO-style layout of transformers' object-detection examples (see the module docstring).

    Arguments as for [`build_cluttered_classification`]; `image_size` must be at least 56. Image ids count the scenes
    of the split from 0; object ids are unique within the split.
    """
    _check_args("detection", num_examples, image_size, seed)
    by_class = _check_pool(images, labels)
    scene_ids = iter(range(num_examples))

    def render(rng: np.random.Generator) -> dict:
        image, class_ids, _, instance_map = _render_multi_object(rng, images, by_class, image_size)
        image_id = next(scene_ids)
        return {
            "image": image,
            "image_id": image_id,
            "width": image_size,
            "height": image_size,
            "objects": _objects(class_ids, instance_map, image_id),
            "instance_mask": _encode(instance_map, "PNG"),
        }

    description = f"cropr Fashion-MNIST detection scenes, {image_size}x{image_size}, seed {seed}"
    return _build("detection", render, num_examples, seed, stream, split, description)


_BUILDERS: dict[str, Callable[..., Dataset]] = {
    "cluttered-classification": build_cluttered_classification,
    "multi-label": build_multi_label,
    "segmentation": build_segmentation,
    "detection": build_detection,
}


def load_builtin_task(
    task: str,
    num_train: int,
    num_eval: int,
    image_size: int = 112,
    seed: int = 0,
    source: str | os.PathLike | None = None,
) -> DatasetDict:
    """Build a built-in task from Fashion-MNIST: `train` from the original training images, `validation` from
    the original test images.

    Args:
        task: one of `"cluttered-classification"`, `"multi-label"`, `"segmentation"`, `"detection"`.
        num_train: number of training scenes (at least 1).
        num_eval: number of validation scenes (at least 1).
        image_size: side of the square canvas: at least 28 for classification, 56 for the other tasks.
        seed: random seed (non-negative); the same arguments always give the same scenes.
        source: where to read Fashion-MNIST: `None` to search, a directory, or `"subset"` for the subset shipped in
            the package (see [`~cropr.data.fashion_mnist.load_fashion_mnist`]).

    Returns:
        A `DatasetDict` with `train` and `validation` splits; features as given by [`task_features`]. Each split's
        `info.description` names the Fashion-MNIST source used.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    _check_args(task, num_train, image_size, seed, num_name="num_train")
    _check_count("num_eval", num_eval)
    data = load_fashion_mnist(source)
    build = _BUILDERS[task]
    dataset = DatasetDict(
        train=build(data.train_images, data.train_labels, num_train, image_size, seed, stream=0, split=Split.TRAIN),
        validation=build(
            data.test_images, data.test_labels, num_eval, image_size, seed, stream=1, split=Split.VALIDATION
        ),
    )
    for split in dataset.values():
        split.info.description += f"; Fashion-MNIST from {data.source} ({data.origin})"
    logger.info("Built %s: %d train and %d validation scenes", task, num_train, num_eval)
    return dataset
