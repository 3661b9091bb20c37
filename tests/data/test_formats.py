"""Custom dataset layouts: column lookup, class names, label layouts per task, and segmentation mask checks."""

import json

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image as PILImage

from cropr.data import formats
from cropr.data.formats import (
    LabelFormat,
    detect_label_format,
    find_column,
    find_id2label_file,
    prepare_dataset,
    read_class_names,
    read_id2label,
)

NAMES = {0: "cat", 1: "dog", 2: "bird"}


def splits(labels, feature=None, **extra_columns) -> DatasetDict:
    """Train and validation splits of the same rows: an image column and a `label` column."""
    images = [PILImage.new("RGB", (4, 4)) for _ in labels]
    features = {"image": Image(), **({"label": feature} if feature is not None else {})}
    data = {"image": images, "label": labels, **extra_columns}
    if feature is None:
        dataset = Dataset.from_dict(data)
    else:
        extra = Dataset.from_dict(extra_columns).features if extra_columns else {}
        dataset = Dataset.from_dict(data, features=Features({**features, **extra}))
    return DatasetDict(train=dataset, validation=dataset)


def test_class_names_from_a_list_or_a_file(tmp_path):
    assert read_class_names("cat, dog,bird") == NAMES
    (tmp_path / "names.txt").write_text("cat\ndog\n\nbird\n")
    assert read_class_names(str(tmp_path / "names.txt")) == NAMES
    with pytest.raises(ValueError, match=r"\['dog'\] appear more than once"):
        read_class_names("cat,dog,dog")
    with pytest.raises(ValueError, match="non-empty"):
        read_class_names("cat,,dog")


def test_id2label_files(tmp_path):
    path = tmp_path / "id2label.json"
    path.write_text(json.dumps({"2": "bird", "0": "cat", "1": "dog"}))
    assert read_id2label(path) == NAMES
    assert list(read_id2label(path)) == [0, 1, 2]
    path.write_text(json.dumps(["cat", "dog", "bird"]))
    assert read_id2label(path) == NAMES
    path.write_text(json.dumps({"0": "cat", "2": "bird"}))
    with pytest.raises(ValueError, match="without gaps"):
        read_id2label(path)


def test_id2label_file_beside_the_data_or_on_the_hub(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    assert find_id2label_file(str(tmp_path), None) is None
    (tmp_path / "id2label.json").write_text("{}")
    # The dataset folder, or the folder holding the split folders.
    assert find_id2label_file(str(tmp_path), None) == tmp_path / "id2label.json"
    assert find_id2label_file(None, str(tmp_path / "train")) == tmp_path / "id2label.json"
    assert find_id2label_file(None, str(tmp_path / "train") + "/") == tmp_path / "id2label.json"

    assert find_id2label_file("org/not-downloaded", None) is None  # offline: not in the cache

    def hf_hub_download(repo_id, filename, repo_type):
        assert (filename, repo_type) == ("id2label.json", "dataset")
        if repo_id != "org/segmentation":
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(tmp_path / "id2label.json")

    monkeypatch.setattr(formats, "hf_hub_download", hf_hub_download)
    assert find_id2label_file("org/segmentation", None) == tmp_path / "id2label.json"
    assert find_id2label_file("org/classification", None) is None


def test_missing_columns_name_the_dataset_columns():
    dataset = splits([0, 1], ClassLabel(names=["a", "b"]), scene=[1, 2])
    with pytest.raises(ValueError, match=r"no column 'mask' \(columns: \['image', 'label', 'scene'\]\); set --label"):
        find_column(dataset, "mask", (), "label", "--label_column_name")
    with pytest.raises(
        ValueError, match=r"none of \['annotation'\] is among the columns \['image', 'label', 'scene'\]"
    ):
        find_column(dataset, None, ("annotation",), "label", "--label_column_name")
    assert find_column(dataset, None, ("labels", "label"), "label", "--label_column_name") == "label"


def test_classification_layouts():
    class_label = detect_label_format(
        splits([0, 2], ClassLabel(names=list(NAMES.values()))), "image-classification", "label"
    )
    assert (class_label.layout, class_label.id2label) == ("class_ids", NAMES)
    integers = detect_label_format(splits([0, 2]), "image-classification", "label", id2label=NAMES)
    assert integers.layout == "class_ids"
    assert integers.targets([2, 0]).tolist() == [2, 0]
    strings = detect_label_format(splits(["dog", "cat", "dog"]), "image-classification", "label")
    assert (strings.layout, strings.id2label) == ("class_names", {0: "cat", 1: "dog"})
    assert strings.targets(["dog", "cat"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="without names: pass --class_names"):
        detect_label_format(splits([0, 2]), "image-classification", "label")
    with pytest.raises(ValueError, match=r"class ids -1..1, outside 0..1"):
        detect_label_format(splits([0, 1, -1], ClassLabel(names=["a", "b"])), "image-classification", "label")
    with pytest.raises(ValueError, match="2 class names were given, but column 'label' has 3 classes"):
        detect_label_format(
            splits([0], ClassLabel(names=["a", "b", "c"])), "image-classification", "label", id2label={0: "x", 1: "y"}
        )
    with pytest.raises(ValueError, match="that is multi-label data"):
        detect_label_format(splits([[0], [1]]), "image-classification", "label", id2label=NAMES)


def test_multi_label_class_id_lists_of_any_length_become_multi_hot():
    dataset = splits([[0, 2], [], [1]], List(ClassLabel(names=list(NAMES.values()))))
    label_format = detect_label_format(dataset, "multi-label-classification", "label")
    assert (label_format.layout, label_format.id2label) == ("id_lists", NAMES)
    targets = label_format.targets(dataset["train"]["label"])
    assert targets.dtype == torch.float32
    assert targets.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match=r"class ids 0..3, outside 0..2"):
        detect_label_format(splits([[0, 3]]), "multi-label-classification", "label", id2label=NAMES)


def test_multi_label_name_lists():
    label_format = detect_label_format(splits([["dog", "cat"], ["bird"]]), "multi-label-classification", "label")
    assert label_format.layout == "name_lists"
    assert label_format.id2label == {0: "bird", 1: "cat", 2: "dog"}
    assert label_format.targets([["dog", "cat"]]).tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError, match=r"names that are no class: \['fish'\]"):
        detect_label_format(splits([["fish"]]), "multi-label-classification", "label", id2label=NAMES)


def test_multi_hot_lists_need_one_value_per_named_class():
    floats = splits([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    label_format = detect_label_format(floats, "multi-label-classification", "label", id2label=NAMES)
    assert label_format.layout == "multi_hot"
    assert label_format.targets(floats["train"]["label"]).tolist() == [[1, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="multi-hot lists of 3..3 values, but there are 2 classes"):
        detect_label_format(floats, "multi-label-classification", "label", id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match="without names"):
        detect_label_format(floats, "multi-label-classification", "label")
    # Integer lists are multi-hot only when each holds one 0/1 entry per class; otherwise they are class ids.
    multi_hot_ints = detect_label_format(splits([[0, 1, 1], [0, 0, 0]]), "multi-label-classification", "label",
                                         id2label=NAMES)  # fmt: skip
    assert multi_hot_ints.layout == "multi_hot"
    ids = detect_label_format(splits([[0, 1], [2, 1, 0]]), "multi-label-classification", "label", id2label=NAMES)
    assert ids.layout == "id_lists"
    with pytest.raises(ValueError, match="that is single-label data"):
        detect_label_format(splits([0, 1], ClassLabel(names=["a", "b"])), "multi-label-classification", "label")


def test_segmentation_needs_a_mask_column_and_class_names():
    masks = [PILImage.new("L", (4, 4)) for _ in range(2)]
    dataset = splits([0, 1], ClassLabel(names=["a", "b"]), annotation=masks)
    with pytest.raises(
        ValueError, match=r"needs a column of masks .*image columns in the dataset: \['image', 'annotation'\]"
    ):
        detect_label_format(dataset, "semantic-segmentation", "label", id2label=NAMES)
    with pytest.raises(ValueError, match="come without class names: pass --id2label"):
        detect_label_format(dataset, "semantic-segmentation", "annotation")
    label_format = detect_label_format(dataset, "semantic-segmentation", "annotation", id2label=NAMES)
    assert (label_format.layout, label_format.reduce_labels) == ("masks", False)
    with pytest.raises(ValueError, match="at most 255 classes"):
        detect_label_format(dataset, "semantic-segmentation", "annotation", id2label={i: str(i) for i in range(256)})
    with pytest.raises(ValueError, match="--do_reduce_labels applies to segmentation masks"):
        detect_label_format(dataset, "image-classification", "label", reduce_labels=True)


def test_prepare_dataset_keeps_and_renames_the_two_columns():
    masks = [PILImage.new("L", (4, 4)) for _ in range(2)]
    dataset = splits([0, 1], ClassLabel(names=["a", "b"]), annotation=masks)
    # `annotation` is found without being named (ADE20k / scene_parse_150), although a `label` column exists.
    prepared, label_format = prepare_dataset(
        dataset.rename_column("label", "scene"), "semantic-segmentation", id2label=NAMES
    )
    assert prepared["train"].column_names == ["image", "label"]
    assert label_format.layout == "masks"
    renamed, _ = prepare_dataset(dataset.rename_column("image", "img"), "image-classification", label_column="label")
    assert renamed["validation"].column_names == ["image", "label"]
    with pytest.raises(ValueError, match="holds ClassLabel.*not images; set --image_column_name"):
        prepare_dataset(dataset, "image-classification", image_column="label", label_column="annotation")


def test_masks_are_checked_and_reduced():
    plain = LabelFormat("masks", NAMES)
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(plain.mask(PILImage.fromarray(mask), shape=(2, 2)), mask)
    # ADE20k's convention: 0 = unlabelled (ignored), k = class k - 1; 255 stays ignored.
    reduced = LabelFormat("masks", NAMES, reduce_labels=True)
    ade = np.array([[0, 1], [3, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(reduced.mask(ade, shape=(2, 2)), [[255, 0], [2, 255]])
    with pytest.raises(ValueError, match=r"values \[3\] outside class ids 0..2 and 255.*pass --do_reduce_labels"):
        plain.mask(ade, shape=(2, 2))
    with pytest.raises(ValueError, match=r"values \[7\]"):
        plain.mask(np.array([[7, 0]]), shape=(1, 2))
    # A stored 256 would become 255 (ignored) when reduced: it is refused as no class instead.
    with pytest.raises(ValueError, match=r"values \[4, 256\] outside 0 = unlabelled, 1..3 = classes 0..2"):
        reduced.mask(np.array([[4, 256, 255]]), shape=(1, 3))
    with pytest.raises(ValueError, match="masks must have their image's size"):
        plain.mask(mask, shape=(2, 3))


def test_mask_image_modes():
    names = {index: str(index) for index in range(5)}
    label_format = LabelFormat("masks", names)
    values = np.array([[0, 4], [3, 1]])
    sixteen_bit = PILImage.fromarray(values.astype(np.uint16))
    assert sixteen_bit.mode == "I;16"
    palette = PILImage.fromarray(values.astype(np.uint8)).convert("P")
    grey_rgb = PILImage.fromarray(values.astype(np.uint8)).convert("RGB")
    for mask in (sixteen_bit, palette, grey_rgb, values.tolist()):
        result = label_format.mask(mask, shape=(2, 2))
        assert result.dtype == np.uint8
        np.testing.assert_array_equal(result, values)
    colour = PILImage.fromarray(np.array([[[1, 2, 3], [0, 0, 0]]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \(1, 2, 3\) \(mode RGB\) is not one class id per pixel"):
        label_format.mask(colour, shape=(1, 2))
    with pytest.raises(ValueError, match="fractional"):
        label_format.mask(np.array([[0.5, 1.0]]), shape=(1, 2))
