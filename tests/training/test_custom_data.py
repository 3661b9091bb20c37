"""The Trainer scripts on custom datasets in the layouts Hub datasets use, built here as parquet files and folders."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from test_run import load_saved

from cropr.data.formats import LabelFormat
from cropr.training.run import run
from cropr.training.tasks import TASKS, default_image_processor
from cropr.training.transforms import make_transforms

BUILTIN_ONLY = ("--canvas_size", "--num_train_samples", "--num_eval_samples")
CUSTOM_RUN = [
    arg
    for flag, value in zip(TINY_RUN[::2], TINY_RUN[1::2], strict=True)
    if flag not in BUILTIN_ONLY
    for arg in (flag, value)
]
ANIMALS = ["cat", "dog", "bird"]
SIZE = 16


def images(count: int, seed: int = 0) -> list[PILImage.Image]:
    rng = np.random.default_rng(seed)
    return [PILImage.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(count)]


def masks(count: int, max_value: int, seed: int = 0) -> list[PILImage.Image]:
    rng = np.random.default_rng(seed)
    return [PILImage.fromarray(rng.integers(0, max_value + 1, (SIZE, SIZE), dtype=np.uint8)) for _ in range(count)]


def write_parquet(folder, columns: dict, features: Features | None = None) -> None:
    """`train.parquet` and `validation.parquet` (the same rows) in `folder`: what `load_dataset(folder)` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_dict(columns, features=features)
    for split in ("train", "validation"):
        dataset.to_parquet(folder / f"{split}.parquet")


def train(task: str, tmp_path, *options: str) -> dict:
    return run(task, CUSTOM_RUN + ["--output_dir", str(tmp_path / "out"), *options])


def test_classification_parquet_with_named_columns(tmp_path):
    # CIFAR-100's layout: images in `img`, the classes in `fine_label`, and another label column beside them.
    features = Features({"img": Image(), "fine_label": ClassLabel(names=ANIMALS), "label": Value("int64")})
    write_parquet(tmp_path / "data", {"img": images(8), "fine_label": [0, 1, 2, 0] * 2, "label": [5] * 8}, features)
    results = train("image-classification", tmp_path, "--dataset_name", str(tmp_path / "data"),
                    "--image_column_name", "img", "--label_column_name", "fine_label")  # fmt: skip
    assert 0.0 <= results["pruned_metric"] <= 1.0
    assert load_saved("image-classification", tmp_path / "out").config.id2label == dict(enumerate(ANIMALS))


def test_classification_imagefolder_keeps_working(tmp_path):
    for split in ("train", "validation"):
        for name, image in zip(ANIMALS * 2, images(6), strict=True):
            (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / split / name / f"{len(list((tmp_path / split / name).iterdir()))}.png")
    train("image-classification", tmp_path, "--train_dir", str(tmp_path / "train"),
          "--validation_dir", str(tmp_path / "validation"))  # fmt: skip
    assert load_saved("image-classification", tmp_path / "out").config.id2label == dict(enumerate(sorted(ANIMALS)))


def test_missing_column_lists_the_dataset_columns(tmp_path):
    write_parquet(tmp_path / "data", {"image": images(2), "label": [0, 1]}, Features(
        {"image": Image(), "label": ClassLabel(names=ANIMALS)}))  # fmt: skip
    with pytest.raises(ValueError, match=r"no column 'tags' \(columns: \['image', 'label'\]\)"):
        train("multi-label-classification", tmp_path, "--dataset_name", str(tmp_path / "data"),
              "--label_column_name", "tags")  # fmt: skip


def test_multi_label_lists_of_class_ids(tmp_path):
    labels = [[0], [1, 2], [], [0, 2], [2], [0, 1, 2], [1], [0, 1]]
    features = Features({"image": Image(), "labels": List(ClassLabel(names=ANIMALS))})
    write_parquet(tmp_path / "data", {"image": images(8), "labels": labels}, features)
    results = train("multi-label-classification", tmp_path, "--dataset_name", str(tmp_path / "data"))
    assert 0.0 <= results["pruned_metric"] <= 1.0
    assert load_saved("multi-label-classification", tmp_path / "out").config.id2label == dict(enumerate(ANIMALS))


def test_multi_label_multi_hot_floats_named_by_a_file(tmp_path):
    rng = np.random.default_rng(0)
    write_parquet(tmp_path / "data", {"image": images(8), "tags": rng.integers(0, 2, (8, 3)).astype(float).tolist()})
    (tmp_path / "names.txt").write_text("\n".join(ANIMALS) + "\n")
    train("multi-label-classification", tmp_path, "--dataset_name", str(tmp_path / "data"),
          "--label_column_name", "tags", "--class_names", str(tmp_path / "names.txt"))  # fmt: skip
    assert load_saved("multi-label-classification", tmp_path / "out").config.id2label == dict(enumerate(ANIMALS))


def test_segmentation_imagefolder_with_masks_and_id2label_json(tmp_path):
    # Images and masks side by side; metadata.jsonl pairs them (`label_file_name` becomes the `label` image column).
    for split in ("train", "validation"):
        folder = tmp_path / "scenes" / split
        folder.mkdir(parents=True)
        lines = []
        for index, (image, mask) in enumerate(zip(images(4), masks(4, max_value=2), strict=True)):
            image.save(folder / f"image{index}.png")
            mask.save(folder / f"mask{index}.png")
            lines.append(json.dumps({"file_name": f"image{index}.png", "label_file_name": f"mask{index}.png"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "scenes" / "id2label.json").write_text(json.dumps({"0": "background", "1": "road", "2": "car"}))
    train("semantic-segmentation", tmp_path, "--train_dir", str(tmp_path / "scenes" / "train"),
          "--validation_dir", str(tmp_path / "scenes" / "validation"))  # fmt: skip
    config = load_saved("semantic-segmentation", tmp_path / "out").config
    assert config.id2label == {0: "background", 1: "road", 2: "car"}
    assert config.aux_ignored_labels == [0]


def write_scene_parse_150_like(folder) -> None:
    """ADE20k's layout: `image`, `annotation` (0 = unlabelled, k + 1 = class k) and `scene_category`."""
    features = Features({"image": Image(), "annotation": Image(), "scene_category": ClassLabel(names=["a", "b"])})
    columns = {"image": images(8), "annotation": masks(8, max_value=3), "scene_category": [0, 1] * 4}
    write_parquet(folder, columns, features)


def test_segmentation_scene_parse_150_layout(tmp_path):
    write_scene_parse_150_like(tmp_path / "ade")
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "wall", "1": "building", "2": "sky"}))
    data = ["--dataset_name", str(tmp_path / "ade"), "--id2label", str(tmp_path / "id2label.json")]
    results = train("semantic-segmentation", tmp_path, *data, "--do_reduce_labels")
    assert 0.0 <= results["pruned_metric"] <= 1.0
    assert load_saved("semantic-segmentation", tmp_path / "out").config.id2label == {0: "wall", 1: "building", 2: "sky"}
    # Without --do_reduce_labels, mask value 3 is no class of the three: the run says what to do.
    with pytest.raises(ValueError, match=r"values \[3\] outside class ids 0..2.*pass --do_reduce_labels"):
        train("semantic-segmentation", tmp_path, *data, "--label_column_name", "annotation")


def test_options_that_do_not_apply_fail_before_loading(tmp_path):
    builtin = CUSTOM_RUN + ["--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--class_names, --do_reduce_labels describe your own data"):
        run("semantic-segmentation", builtin + ["--class_names", "a,b", "--do_reduce_labels"])
    with pytest.raises(ValueError, match="--do_reduce_labels applies to segmentation masks, not image-classification"):
        run("image-classification", builtin + ["--train_dir", str(tmp_path), "--do_reduce_labels"])
    with pytest.raises(ValueError, match="--class_names or --id2label, not both"):
        run("image-classification", builtin + ["--train_dir", str(tmp_path), "--class_names", "a", "--id2label", "x"])


def test_sixteen_bit_images_are_scaled_in_the_training_transform():
    task = TASKS["image-classification"]
    transform = make_transforms(task, default_image_processor(task, SIZE), augment=False, seed=0)
    grey = PILImage.fromarray(np.full((SIZE, SIZE), 32896, dtype=np.uint16))  # 128 in 8 bits
    pixel_values = transform({"image": [grey], "label": [0]})["pixel_values"]
    # 128/255 normalised with mean and std 0.5; PIL's clamping to 255 would give 1.0.
    torch.testing.assert_close(pixel_values, torch.full_like(pixel_values, (128 / 255 - 0.5) / 0.5))


def test_flipped_masks_stay_on_their_flipped_images():
    task = TASKS["semantic-segmentation"]
    transform = make_transforms(task, default_image_processor(task, SIZE), augment=True, seed=0,
                                label_format=LabelFormat("masks", {0: "background", 1: "object"}))  # fmt: skip
    left = np.zeros((SIZE, SIZE), dtype=np.uint8)
    left[:, : SIZE // 4] = 1
    image = PILImage.fromarray(left * 255).convert("RGB")
    batch = transform({"image": [image] * 16, "label": [PILImage.fromarray(left)] * 16}, indices=range(16))
    bright = batch["pixel_values"][:, 0] > 0
    assert (batch["labels"] == bright.long()).all()
    assert 0 < bright[:, 0, 0].sum() < 16  # some examples were flipped, some not
