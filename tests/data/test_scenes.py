"""Built-in scene tasks: features, determinism, argument checks, split provenance and mask consistency."""

import gzip

import numpy as np
import pytest
from datasets import ClassLabel, DatasetDict

from cropr.data import FASHION_MNIST_CLASSES, id2label, label2id, load_builtin_task, num_labels, task_features
from cropr.data.fashion_mnist import IDX_FILES
from cropr.data.scenes import MASK_THRESHOLD, NOISE_MAX

TASKS = ["cluttered-classification", "multi-label", "segmentation"]


def image_bytes(dataset) -> list[bytes]:
    return [np.asarray(example["image"]).tobytes() for example in dataset]


@pytest.mark.parametrize("task", TASKS)
def test_features_and_shapes(task):
    dataset = load_builtin_task(task, num_train=6, num_eval=3, image_size=64, source="subset")
    assert isinstance(dataset, DatasetDict) and set(dataset) == {"train", "validation"}
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (6, 3)
    assert dataset["train"].features == task_features(task)
    assert "subset" in dataset["train"].info.description
    for example in dataset["train"]:
        assert example["image"].mode == "RGB" and example["image"].size == (64, 64)
        if task == "cluttered-classification":
            assert 0 <= example["label"] < 10
        elif task == "multi-label":
            labels = np.asarray(example["labels"])
            assert labels.shape == (10,) and set(labels.tolist()) <= {0.0, 1.0}
        else:
            assert example["label"].mode == "L" and example["label"].size == (64, 64)
            assert np.asarray(example["label"]).max() <= 10


def test_label_names():
    assert id2label("cluttered-classification") == dict(enumerate(FASHION_MNIST_CLASSES))
    assert id2label("multi-label")[9] == "Ankle boot"
    segmentation = id2label("segmentation")
    assert len(segmentation) == num_labels("segmentation") == 11
    assert segmentation[0] == "background" and segmentation[1] == "T-shirt/top" and segmentation[10] == "Ankle boot"
    assert label2id("segmentation")["Bag"] == 9
    feature = task_features("cluttered-classification")["label"]
    assert isinstance(feature, ClassLabel) and feature.names == list(FASHION_MNIST_CLASSES)
    assert task_features("multi-label")["labels"].length == 10


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task):
    first = load_builtin_task(task, num_train=8, num_eval=2, seed=3, source="subset")
    again = load_builtin_task(task, num_train=8, num_eval=2, seed=3, source="subset")
    other = load_builtin_task(task, num_train=8, num_eval=2, seed=4, source="subset")
    longer = load_builtin_task(task, num_train=12, num_eval=2, seed=3, source="subset")
    assert image_bytes(first["train"]) == image_bytes(again["train"])
    assert image_bytes(first["validation"]) == image_bytes(again["validation"])
    label_column = "labels" if task == "multi-label" else "label"
    if task != "segmentation":  # label maps are PIL images, compared through the scenes themselves
        assert first["train"][label_column] == again["train"][label_column]
    assert image_bytes(first["train"]) != image_bytes(other["train"])
    # Scene i depends only on (seed, split, i): more scenes extend the dataset.
    assert image_bytes(longer["train"])[:8] == image_bytes(first["train"])


def test_multi_label_has_two_to_four_distinct_classes():
    dataset = load_builtin_task("multi-label", num_train=60, num_eval=1, source="subset")["train"]
    counts = np.asarray(dataset["labels"]).sum(axis=1)
    assert counts.min() >= 2 and counts.max() <= 4
    assert set(counts.tolist()) == {2.0, 3.0, 4.0}


def test_segmentation_masks_match_the_garments():
    segmentation = load_builtin_task("segmentation", num_train=30, num_eval=1, seed=1, source="subset")["train"]
    multi_label = load_builtin_task("multi-label", num_train=30, num_eval=1, seed=1, source="subset")["train"]
    # Segmentation uses the multi-label scenes, so the classes in each map are the scene's multi-hot labels.
    assert image_bytes(segmentation) == image_bytes(multi_label)
    for example, labels in zip(segmentation, multi_label["labels"], strict=True):
        image, label_map = np.asarray(example["image"]), np.asarray(example["label"])
        classes_in_map = set(np.unique(label_map).tolist()) - {0}
        assert classes_in_map == {class_id + 1 for class_id in np.flatnonzero(labels)}
        # A garment pixel is above the threshold in its brightest channel, hence brighter than any noise; pixels
        # no brighter than the noise are background.
        brightest = image.max(axis=-1)
        assert brightest[label_map > 0].min() > MASK_THRESHOLD > NOISE_MAX
        assert (label_map[brightest <= NOISE_MAX] == 0).all()
        assert (label_map == 0).mean() > 0.3


def test_cluttered_classification_is_mostly_background():
    dataset = load_builtin_task("cluttered-classification", num_train=40, num_eval=1, source="subset")["train"]
    images = np.stack([np.asarray(image) for image in dataset["image"]]).max(axis=-1)
    # 16x16 patches of the 112x112 canvas whose every pixel is within the noise level.
    patches = images.reshape(len(images), 7, 16, 7, 16).max(axis=(2, 4))
    assert (patches <= NOISE_MAX).mean() > 0.5
    assert len(set(dataset["label"])) >= 8


def write_split_marked_data(directory, train_value, test_value):
    """Fake Fashion-MNIST, one image per class and split: squares of `train_value` resp. `test_value`."""
    directory.mkdir()
    for split, value in (("train", train_value), ("test", test_value)):
        labels = np.arange(10, dtype=np.uint8)
        images = np.zeros((10, 28, 28), dtype=np.uint8)
        images[:, 4:24, 4:24] = value
        for role, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
            (directory / f"{IDX_FILES[role]}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return directory


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("blank_split", ["train", "validation"])
def test_splits_use_their_own_original_images(task, blank_split, tmp_path):
    # One original split has blank garments: the scenes built from it must hold nothing but background noise.
    values = (0, 200) if blank_split == "train" else (200, 0)
    directory = write_split_marked_data(tmp_path / "fake", *values)
    dataset = load_builtin_task(task, num_train=10, num_eval=10, image_size=56, source=directory)
    assert str(directory) in dataset["validation"].info.description
    other_split = "validation" if blank_split == "train" else "train"
    assert max(np.asarray(image).max() for image in dataset[blank_split]["image"]) <= NOISE_MAX
    assert min(np.asarray(image).max() for image in dataset[other_split]["image"]) >= 200


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(task="keypoints"), "task"),
        (dict(num_train=0), "num_train"),
        (dict(num_eval=0), "num_eval"),
        (dict(num_train=2.5), "num_train"),
        (dict(seed=-1), "seed"),
        (dict(image_size=27), "image_size"),
        (dict(task="multi-label", image_size=55), "image_size"),
        (dict(task="segmentation", image_size=40), "image_size"),
        (dict(task="detection", image_size=40), "image_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    arguments = dict(task="cluttered-classification", num_train=2, num_eval=2, source="subset") | kwargs
    with pytest.raises(ValueError, match=name):
        load_builtin_task(**arguments)


def test_smallest_canvases():
    classification = load_builtin_task("cluttered-classification", 2, 1, image_size=28, source="subset")
    assert classification["train"][0]["image"].size == (28, 28)
    segmentation = load_builtin_task("segmentation", 2, 1, image_size=56, source="subset")
    assert segmentation["train"][0]["label"].size == (56, 56)


def test_detection_boxes_and_instance_masks_describe_the_segmentation_scenes():
    detection = load_builtin_task("detection", num_train=6, num_eval=2, image_size=64, seed=2, source="subset")
    segmentation = load_builtin_task("segmentation", num_train=6, num_eval=2, image_size=64, seed=2, source="subset")
    assert detection["train"].features == task_features("detection")
    assert image_bytes(detection["train"]) == image_bytes(segmentation["train"])
    object_ids = []
    for index, (scene, segmented) in enumerate(zip(detection["train"], segmentation["train"], strict=True)):
        assert scene["image_id"] == index and (scene["width"], scene["height"]) == (64, 64)
        instances, classes = np.asarray(scene["instance_mask"]), np.asarray(segmented["label"])
        assert 2 <= len(scene["objects"]) <= 4 and instances.max() == len(scene["objects"])
        for number, annotation in enumerate(scene["objects"], start=1):
            rows, columns = np.nonzero(instances == number)
            # COCO [x, y, width, height]: the tight box around the instance's mask pixels, whose class it carries.
            assert annotation["bbox"] == [columns.min(), rows.min(), np.ptp(columns) + 1, np.ptp(rows) + 1]
            assert annotation["area"] == len(rows)
            assert set(classes[rows, columns].tolist()) == {annotation["category"] + 1}
            object_ids.append(annotation["id"])
        assert ((instances > 0) == (classes > 0)).all()
    assert len(set(object_ids)) == len(object_ids)
