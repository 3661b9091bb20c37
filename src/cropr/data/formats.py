"""Custom datasets for the Trainer scripts: which columns hold the images and labels, what the classes are called, and
how each label layout that Hub datasets use becomes the targets a CroprViT head trains on.

Label layouts ([`LabelFormat.layout`]), found from the label column's feature and values by [`detect_label_format`]:

- image classification: `"class_ids"`, one integer per image (a `ClassLabel`, or plain integers named separately);
  `"class_names"`, one string per image.
- multi-label classification: `"id_lists"`, a list of class ids of any length per image (`Sequence(ClassLabel)` or
  integers); `"name_lists"`, a list of class names per image; `"multi_hot"`, one value per class (floats or booleans,
  or integer lists holding exactly one 0/1 entry per class).
- semantic segmentation: `"masks"`, one class id per pixel (a mask image, or a 2-D array) with 255 for pixels that
  the loss and the metrics ignore. With `reduce_labels` (ADE20k's convention, transformers' `do_reduce_labels`) mask
  value 0 marks unlabelled pixels and becomes 255, and value k is class k - 1.

Class names come from the caller (`id2label`, e.g. read by [`read_class_names`] or [`read_id2label`]), else from the
label feature (`ClassLabel`, or a list of them), else, for string labels, from the sorted set of strings in the data.

Example:

```python
from datasets import load_dataset
from cropr.data.formats import prepare_dataset, read_id2label

dataset = load_dataset("scene_parse_150")  # columns image, annotation, scene_category
dataset, label_format = prepare_dataset(
    dataset, "semantic-segmentation", id2label=read_id2label("ade20k-id2label.json"), reduce_labels=True
)
example = dataset["train"][0]
label_format.mask(example["label"], shape=(example["image"].height, example["image"].width))  # uint8, 255 = ignored
```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Array2D, ClassLabel, DatasetDict, Image, LargeList, List, Value
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
"""Mask value of pixels that the segmentation loss and metrics skip (the models' `semantic_loss_ignore_index`)."""

IMAGE_COLUMNS = ("image", "img", "pixel_values")
"""Image column names tried, in order, when none is given."""

LABEL_COLUMNS = {
    "image-classification": ("label", "labels"),
    "multi-label-classification": ("labels", "label"),
    "semantic-segmentation": ("label", "annotation"),
}
"""Label column names tried, in order, when none is given, per task."""

ID2LABEL_FILE = "id2label.json"
"""File name of class names next to a dataset (`{"0": "wall", "1": "building", ...}`), as on the Hub."""

LAYOUTS = {  # the label layouts of each task
    "image-classification": ("class_ids", "class_names"),
    "multi-label-classification": ("id_lists", "name_lists", "multi_hot"),
    "semantic-segmentation": ("masks",),
}

_LIST_FEATURES = (List, LargeList)


def read_class_names(spec: str) -> dict[int, str]:
    """Class names from a comma-separated string (`"cat,dog,bird"`) or a text file with one name per line.

    Returns:
        `dict[int, str]`: the names by class id, in the order given.
    """
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in spec.split(",")]
    if not names or any(not name for name in names):
        raise ValueError(f"label names must be non-empty, comma-separated or one per line in a file; got {spec!r}")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"label names must be distinct; {duplicates} appear more than once in {spec!r}")
    return dict(enumerate(names))


def read_id2label(path: str | Path) -> dict[int, str]:
    """Class names from a JSON file: an object of id -> name (`{"0": "wall", ...}`, transformers' `id2label`) or a list.

    Raises:
        ValueError: when the ids are not exactly `0 .. N-1`.
    """
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read class names from {path}: {error}") from None
    if isinstance(content, list):
        content = dict(enumerate(content))
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{path} must hold a JSON object of class id -> name (or a list of names)")
    try:
        id2label = {int(index): str(name) for index, name in content.items()}
    except ValueError:
        raise ValueError(f"{path}: class ids must be integers, got {sorted(content)[:5]}") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"{path}: class ids must be 0..{len(id2label) - 1} without gaps, got {sorted(id2label)[:10]}")
    return dict(sorted(id2label.items()))


def find_id2label_file(dataset_name: str | None = None, train_dir: str | None = None) -> Path | None:
    """The dataset's [`ID2LABEL_FILE`], or None where it has none.

    Looked for in the folder `dataset_name` or `train_dir` (or the folder above `train_dir`, which holds the split
    folders), else in the Hub dataset repository `dataset_name`, as transformers' segmentation example reads it.
    """
    parent = os.path.dirname(os.path.normpath(train_dir)) if train_dir else None
    for folder in (dataset_name, train_dir, parent):
        if folder and (candidate := Path(folder) / ID2LABEL_FILE).is_file():
            return candidate
    if dataset_name and not Path(dataset_name).is_dir():
        try:
            return Path(hf_hub_download(dataset_name, ID2LABEL_FILE, repo_type="dataset"))
        except (EntryNotFoundError, RepositoryNotFoundError, HFValidationError):  # no such file, repo, or offline
            return None
    return None


def find_column(dataset: DatasetDict, given: str | None, candidates: Sequence[str], what: str, flag: str) -> str:
    """The column `given`, or the first of `candidates` present; it must be in every split.

    Raises:
        ValueError: naming the split, its columns and the flag to set, when the column is missing.
    """
    first = next(iter(dataset.values()))
    column = given or next((name for name in candidates if name in first.column_names), None)
    if column is None:
        raise ValueError(
            f"found no {what} column: none of {list(candidates)} is among the columns {first.column_names}; set {flag}"
        )
    for split_name, split in dataset.items():
        if column not in split.column_names:
            raise ValueError(
                f"the {split_name} split has no column {column!r} (columns: {split.column_names}); set {flag}"
            )
    return column


@dataclass(frozen=True)
class LabelFormat:
    """How the values of a label column become training targets.

    Args:
        layout: one of the layouts in the module docstring.
        id2label: class names by id `0 .. N-1`.
        reduce_labels: masks only: 0 marks unlabelled pixels (becomes 255) and value k is class k - 1.
    """

    layout: str
    id2label: dict[int, str]
    reduce_labels: bool = False

    def __post_init__(self):
        if not any(self.layout in layouts for layouts in LAYOUTS.values()):
            raise ValueError(f"unknown label layout {self.layout!r}; expected one of {sum(LAYOUTS.values(), ())}")
        if self.reduce_labels and self.layout != "masks":
            raise ValueError("reduce_labels applies to segmentation masks only")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @cached_property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in self.id2label.items()}

    def targets(self, labels: Sequence[Any]) -> torch.Tensor:
        """The targets of a batch of label values: class ids `(B,)` (long) or multi-hot `(B, num_labels)` (float)."""
        if self.layout == "class_ids":
            return torch.tensor(labels, dtype=torch.long)
        if self.layout == "class_names":
            return torch.tensor([self.label2id[name] for name in labels], dtype=torch.long)
        if self.layout == "multi_hot":
            return torch.tensor(np.asarray(labels, dtype=np.float32))
        if self.layout in ("id_lists", "name_lists"):
            targets = torch.zeros(len(labels), self.num_labels)
            for row, classes in enumerate(labels):
                ids = [self.label2id[name] for name in classes] if self.layout == "name_lists" else list(classes)
                targets[row, ids] = 1.0
            return targets
        raise ValueError("segmentation labels are masks: use `LabelFormat.mask`")

    def mask(self, mask: PILImage.Image | np.ndarray | Sequence, shape: tuple[int, int]) -> np.ndarray:
        """A mask as a `uint8` array of class ids (255 = ignored), checked against the classes and the image.

        Args:
            mask: a mask image of mode `L`, `P`, `I;16`, `I`, `1` (or `RGB` with equal channels), or a 2-D array.
            shape: `(height, width)` of the image the mask belongs to.

        Raises:
            ValueError: for a colour mask, a mask of another size than its image, or values that are no class id.
        """
        values = mask_array(mask)
        if values.shape != tuple(shape):
            raise ValueError(
                f"a mask of {values.shape[1]}x{values.shape[0]} pixels belongs to an image of {shape[1]}x{shape[0]}: "
                "masks must have their image's size"
            )
        # Checked before reducing, so that no stored value can turn into the ignore index on the way.
        stored_classes = self.num_labels + int(self.reduce_labels)
        if values.min() < 0 or values.max() >= stored_classes:
            invalid = np.unique(values[(values < 0) | ((values >= stored_classes) & (values != IGNORE_INDEX))])
            if invalid.size:
                if self.reduce_labels:
                    expected = f"0 = unlabelled, 1..{stored_classes - 1} = classes 0..{self.num_labels - 1}"
                else:
                    expected = f"class ids 0..{self.num_labels - 1}"
                hint = ""
                if not self.reduce_labels and invalid.max() == self.num_labels:
                    hint = (
                        "; if 0 marks unlabelled pixels and class k is stored as k + 1 (as in ADE20k), pass "
                        "--do_reduce_labels"
                    )
                raise ValueError(
                    f"a mask holds values {invalid[:10].tolist()} outside {expected} and {IGNORE_INDEX} (ignored): "
                    f"the dataset has {self.num_labels} classes{hint}"
                )
        if self.reduce_labels:
            values = np.where((values == 0) | (values == IGNORE_INDEX), IGNORE_INDEX, values - 1)
        return values.astype(np.uint8)


def mask_array(mask: PILImage.Image | np.ndarray | Sequence) -> np.ndarray:
    """The class ids of a segmentation mask as a 2-D integer array (`int64`).

    Raises:
        ValueError: for colour masks (channels that differ) and non-integer values.
    """
    values = np.asarray(mask)
    if values.ndim == 3 and (values == values[..., :1]).all():
        values = values[..., 0]
    if values.ndim != 2:
        mode = f" (mode {mask.mode})" if isinstance(mask, PILImage.Image) else ""
        raise ValueError(
            f"a segmentation mask of shape {values.shape}{mode} is not one class id per pixel: masks must be "
            "single-channel images (mode L, P or I) or 2-D arrays; convert colour-coded masks to class ids first"
        )
    if values.dtype.kind == "f":
        if not np.array_equal(values, np.round(values)):
            raise ValueError("a segmentation mask holds fractional values: masks must hold integer class ids")
    elif values.dtype.kind not in "biu":
        raise ValueError(f"a segmentation mask holds {values.dtype} values: masks must hold integer class ids")
    return values.astype(np.int64)


def detect_label_format(
    dataset: DatasetDict,
    task: str,
    column: str,
    id2label: dict[int, str] | None = None,
    reduce_labels: bool = False,
) -> LabelFormat:
    """The [`LabelFormat`] of `column` for `task`, checked against the values of every split.

    Args:
        dataset: the splits; only the label column is read (no image is decoded).
        task: `"image-classification"`, `"multi-label-classification"` or `"semantic-segmentation"`.
        column: the label column.
        id2label: class names given by the user; they replace the feature's (whose number they must match).
        reduce_labels: segmentation: masks use 0 for unlabelled pixels and k + 1 for class k.

    Raises:
        ValueError: for a column that does not fit the task, missing class names, or values that are no class of
            the names (ids out of range, unknown names, multi-hot lists of another length than the classes).
    """
    if task not in LABEL_COLUMNS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(LABEL_COLUMNS)}")
    if reduce_labels and task != "semantic-segmentation":
        raise ValueError(f"--do_reduce_labels applies to segmentation masks, not {task}")
    feature = next(iter(dataset.values())).features[column]
    values = [split.data.column(column) for split in dataset.values()]
    if task == "semantic-segmentation":
        return _mask_format(dataset, column, feature, id2label, reduce_labels)
    if task == "image-classification":
        layout, names = _single_label_layout(column, feature, values, id2label)
    else:
        layout, names = _multi_label_layout(column, feature, values, id2label)
    _check_values(column, layout, names, values)
    logger.info("label column %r: layout %s, %d classes", column, layout, len(names))
    return LabelFormat(layout, names)


def prepare_dataset(
    dataset: DatasetDict,
    task: str,
    image_column: str | None = None,
    label_column: str | None = None,
    id2label: dict[int, str] | None = None,
    reduce_labels: bool = False,
    target_columns: tuple[str, str] | None = None,
) -> tuple[DatasetDict, LabelFormat]:
    """Keep the image and label columns of a custom dataset (renamed), and find its [`LabelFormat`].

    Args:
        dataset: the splits, e.g. from `load_dataset`.
        task: `"image-classification"`, `"multi-label-classification"` or `"semantic-segmentation"`.
        image_column: the image column; default: the first of [`IMAGE_COLUMNS`] present.
        label_column: the label column; default: the first of the task's [`LABEL_COLUMNS`] present.
        id2label: class names given by the user (see [`detect_label_format`]).
        reduce_labels: segmentation: masks use 0 for unlabelled pixels and k + 1 for class k.
        target_columns: names of the image and label columns in the result; default: the task's first names.

    Returns:
        The splits with only the two columns, and the label format.
    """
    if task not in LABEL_COLUMNS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(LABEL_COLUMNS)}")
    image_column = find_column(dataset, image_column, IMAGE_COLUMNS, "image", "--image_column_name")
    label_column = find_column(dataset, label_column, LABEL_COLUMNS[task], "label", "--label_column_name")
    if image_column == label_column:
        raise ValueError(f"the image and label columns are both {image_column!r}")
    image_feature = next(iter(dataset.values())).features[image_column]
    if not isinstance(image_feature, Image):
        raise ValueError(f"column {image_column!r} holds {image_feature}, not images; set --image_column_name")
    label_format = detect_label_format(dataset, task, label_column, id2label, reduce_labels)
    image_target, label_target = target_columns or (IMAGE_COLUMNS[0], LABEL_COLUMNS[task][0])
    dataset = dataset.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, image_target), (label_column, label_target)) if old != new}
    return (dataset.rename_columns(renames) if renames else dataset), label_format


def _mask_format(
    dataset: DatasetDict, column: str, feature, id2label: dict[int, str] | None, reduce_labels: bool
) -> LabelFormat:
    is_nested_list = isinstance(feature, _LIST_FEATURES) and isinstance(feature.feature, _LIST_FEATURES)
    if not isinstance(feature, (Image, Array2D)) and not is_nested_list:
        first = next(iter(dataset.values()))
        images = [name for name, other in first.features.items() if isinstance(other, Image) and name != column]
        raise ValueError(
            f"segmentation needs a column of masks (images of class ids), but {column!r} holds {feature}; set "
            f"--label_column_name to the mask column (image columns in the dataset: {images})"
        )
    if id2label is None:
        raise ValueError(
            f"the masks in column {column!r} come without class names: pass --id2label FILE (a JSON object "
            f'{{"0": "name", ...}}) or --class_names a,b,c, or put {ID2LABEL_FILE} in the dataset folder'
        )
    if len(id2label) > IGNORE_INDEX:
        raise ValueError(
            f"masks can hold at most {IGNORE_INDEX} classes ({IGNORE_INDEX} marks ignored pixels); got {len(id2label)}"
        )
    logger.info("mask column %r: %d classes, reduce_labels=%s", column, len(id2label), reduce_labels)
    return LabelFormat("masks", id2label, reduce_labels)


def _named(column: str, id2label: dict[int, str] | None, feature_names: list[str] | None) -> dict[int, str]:
    if id2label is not None and feature_names is not None and len(id2label) != len(feature_names):
        raise ValueError(
            f"{len(id2label)} class names were given, but column {column!r} has {len(feature_names)} classes "
            f"({feature_names[:5]}...)"
        )
    if id2label is not None:
        return id2label
    if feature_names is not None:
        return dict(enumerate(feature_names))
    raise ValueError(
        f"column {column!r} holds class ids without names: pass --class_names a,b,c (or a file with one name per "
        f"line) or --id2label FILE, or put {ID2LABEL_FILE} in the dataset folder"
    )


def _string_names(values: list[pa.ChunkedArray], id2label: dict[int, str] | None) -> dict[int, str]:
    if id2label is not None:
        return id2label
    found = set()
    for array in values:
        found.update(name for name in pc.unique(array).to_pylist() if name is not None)
    return dict(enumerate(sorted(found)))


def _value_type(feature) -> pa.DataType | None:
    """The Arrow type of a `Value` feature; None for any other feature."""
    return feature.pa_type if isinstance(feature, Value) else None


def _is_string(pa_type: pa.DataType | None) -> bool:
    return pa_type is not None and (pa.types.is_string(pa_type) or pa.types.is_large_string(pa_type))


def _min_max(array: pa.ChunkedArray) -> tuple[Any, Any]:
    """Smallest and largest value as Python objects; (None, None) for an empty array."""
    return tuple(value.as_py() for value in pc.min_max(array).values())


def _single_label_layout(column: str, feature, values: list[pa.ChunkedArray], id2label) -> tuple[str, dict]:
    pa_type = _value_type(feature)
    if isinstance(feature, ClassLabel):
        return "class_ids", _named(column, id2label, feature.names)
    if pa_type is not None and pa.types.is_integer(pa_type):
        return "class_ids", _named(column, id2label, None)
    if _is_string(pa_type):
        return "class_names", _string_names(values, id2label)
    hint = " (a list per image: that is multi-label data)" if isinstance(feature, _LIST_FEATURES) else ""
    raise ValueError(
        f"image classification needs one class per image (a ClassLabel, an integer or a string); column {column!r} "
        f"holds {feature}{hint}"
    )


def _multi_label_layout(column: str, feature, values: list[pa.ChunkedArray], id2label) -> tuple[str, dict]:
    if not isinstance(feature, _LIST_FEATURES):
        raise ValueError(
            f"multi-label classification needs a list of classes (ids, names or multi-hot values) per image; column "
            f"{column!r} holds {feature}, one value per image (that is single-label data)"
        )
    inner = feature.feature
    pa_type = _value_type(inner)
    if isinstance(inner, ClassLabel):
        return "id_lists", _named(column, id2label, inner.names)
    if _is_string(pa_type):
        return "name_lists", _string_names([pc.list_flatten(array) for array in values], id2label)
    if pa_type is not None and (pa.types.is_floating(pa_type) or pa.types.is_boolean(pa_type)):
        return "multi_hot", _named(column, id2label, None)
    if pa_type is not None and pa.types.is_integer(pa_type):
        names = _named(column, id2label, None)
        # Integer lists are class ids unless every one holds exactly one 0/1 entry per class.
        lengths = [_min_max(pc.list_value_length(array)) for array in values if len(array)]
        entries = [_min_max(pc.list_flatten(array)) for array in values if len(array)]
        one_per_class = bool(lengths) and all(low == high == len(names) for low, high in lengths)
        zero_or_one = all(low is not None and low >= 0 and high <= 1 for low, high in entries)
        return ("multi_hot" if one_per_class and zero_or_one else "id_lists"), names
    raise ValueError(f"column {column!r} holds {feature}: expected lists of class ids, class names or multi-hot values")


def _check_values(column: str, layout: str, names: dict[int, str], values: list[pa.ChunkedArray]) -> None:
    """Check every value of `column` against the classes now, so that training never stops on a bad label."""
    for array in values:
        flat = pc.list_flatten(array) if layout in ("id_lists", "name_lists", "multi_hot") else array
        if array.null_count or flat.null_count:
            raise ValueError(f"column {column!r} has missing labels (null values)")
        if layout in ("class_ids", "id_lists") and len(flat):
            low, high = _min_max(flat)
            if low < 0 or high >= len(names):
                raise ValueError(
                    f"column {column!r} holds class ids {low}..{high}, outside 0..{len(names) - 1} "
                    f"({len(names)} classes); unlabelled examples (-1) must be removed"
                )
        elif layout in ("class_names", "name_lists"):
            unknown = set(pc.unique(flat).to_pylist()) - set(names.values())
            if unknown:
                raise ValueError(f"column {column!r} holds names that are no class: {sorted(unknown)[:10]}")
        elif layout == "multi_hot" and len(array):
            low, high = _min_max(pc.list_value_length(array))
            if (low, high) != (len(names), len(names)):
                raise ValueError(
                    f"column {column!r} holds multi-hot lists of {low}..{high} values, but there are {len(names)} "
                    "classes: each list needs one value per class"
                )


__all__ = [
    "ID2LABEL_FILE",
    "IGNORE_INDEX",
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "LabelFormat",
    "detect_label_format",
    "find_column",
    "find_id2label_file",
    "mask_array",
    "prepare_dataset",
    "read_id2label",
    "read_class_names",
]
