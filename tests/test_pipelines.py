"""`pipeline()` inference with CroprViT: image classification (softmax / sigmoid), image segmentation.

Checkpoints are saved with their image processor next to the weights, so `pipeline(task, model=path)` needs nothing
else. Every pipeline creation and call here must log nothing at WARNING level or above on the `transformers` logger.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, tiny_config_kwargs
from PIL import Image
from skimage import data as skimage_data
from transformers import SegformerImageProcessorPil, ViTImageProcessorPil, pipeline
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from cropr import (
    CroprViTConfig,
    CroprViTForImageClassification,
    CroprViTForMultiLabelClassification,
    CroprViTForSemanticSegmentation,
)

FASHION_LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SEGMENTATION_LABELS = ["background", "cat", "sky"]


def fashion_mnist_images(count: int) -> list[np.ndarray]:
    """`count` 28x28x3 uint8 arrays: the first Fashion-MNIST test images when the shared data is present, else
    Fashion-MNIST-like blobs (a bright centred garment shape with noise on black)."""
    path = SHARED_DATA / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    if path.is_file():
        with gzip.open(path, "rb") as stream:
            stream.read(16)
            pixels = np.frombuffer(stream.read(count * 28 * 28), dtype=np.uint8).reshape(count, 28, 28)
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:28, :28]
        pixels = np.stack(
            [
                ((np.abs(yy - 14) < rng.integers(6, 12)) & (np.abs(xx - 14) < rng.integers(4, 10))) * 200
                + rng.integers(0, 40, size=(28, 28))
                for _ in range(count)
            ]
        ).astype(np.uint8)
    return [np.repeat(image[:, :, None], 3, axis=2) for image in pixels]


class _RecordingHandler(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def no_warnings_logged() -> Iterator[None]:
    """Fail if anything at WARNING or above is logged under `transformers` inside the block (that logger does not
    propagate to the root logger, so pytest's `caplog` would miss it)."""
    logger = logging.getLogger("transformers")
    handler = _RecordingHandler()
    previous_level = logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    messages = [f"{record.levelname} {record.name}: {record.getMessage()[:300]}" for record in handler.records]
    assert not messages, "transformers logged:\n" + "\n".join(messages)


@pytest.fixture
def no_transformers_warnings() -> Iterator[None]:
    """`no_warnings_logged` around the whole test."""
    with no_warnings_logged():
        yield


def classifier_processor() -> ViTImageProcessorPil:
    return ViTImageProcessorPil(size={"height": 32, "width": 32})


def segmentation_processor() -> SegformerImageProcessorPil:
    return SegformerImageProcessorPil(size={"height": 32, "width": 32}, do_reduce_labels=False)


def reference_logits(model: torch.nn.Module, processor, image) -> torch.Tensor:
    """The model's logits for one image, preprocessed by hand (the pipeline must match them)."""
    with torch.no_grad():
        return model(**processor(images=image, return_tensors="pt")).logits[0]


def as_scores(results: list[dict]) -> dict[str, float]:
    return {result["label"]: result["score"] for result in results}


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skimage_data.chelsea())


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def classifier() -> CroprViTForImageClassification:
    torch.manual_seed(0)
    id2label = dict(enumerate(FASHION_LABELS))
    config = CroprViTConfig(**tiny_config_kwargs(num_labels=10, id2label=id2label))
    return CroprViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def multi_label_classifier() -> CroprViTForMultiLabelClassification:
    torch.manual_seed(1)
    return CroprViTForMultiLabelClassification(CroprViTConfig(**tiny_config_kwargs())).eval()


@pytest.fixture(scope="module")
def segmenter() -> CroprViTForSemanticSegmentation:
    torch.manual_seed(2)
    id2label = dict(enumerate(SEGMENTATION_LABELS))
    config = CroprViTConfig(**tiny_config_kwargs(num_labels=3, num_queries=16, id2label=id2label))
    return CroprViTForSemanticSegmentation(config).eval()


@pytest.fixture(scope="module")
def classifier_dir(classifier, tmp_path_factory) -> Path:
    """A checkpoint folder holding the model and its image processor, as every saved CroprViT checkpoint should."""
    path = tmp_path_factory.mktemp("classifier")
    classifier.save_pretrained(path)
    classifier_processor().save_pretrained(path)
    return path


@pytest.mark.usefixtures("no_transformers_warnings")
def test_classification_from_checkpoint_folder_needs_nothing_else(classifier, classifier_dir, chelsea, tmp_path):
    assert (classifier_dir / "preprocessor_config.json").is_file()
    classify = pipeline("image-classification", model=str(classifier_dir))
    assert isinstance(classify.image_processor, ViTImageProcessorPil)
    assert classify.model.config.inference_only is False

    expected = torch.softmax(reference_logits(classifier, classifier_processor(), chelsea), dim=-1)
    image_file = tmp_path / "chelsea.png"
    chelsea.save(image_file)
    for image in (chelsea, str(image_file), np.asarray(chelsea)):
        results = classify(image, top_k=10)
        assert [result["label"] for result in results] == [FASHION_LABELS[i] for i in expected.argsort(descending=True)]
        scores = as_scores(results)
        torch.testing.assert_close(torch.tensor([scores[label] for label in FASHION_LABELS]), expected)
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.usefixtures("no_transformers_warnings")
def test_classification_from_model_object_top_k_and_batching(classifier, astronaut):
    classify = pipeline("image-classification", model=classifier, image_processor=classifier_processor())
    assert len(classify(astronaut)) == 5  # the pipeline's default top_k
    top2 = classify(astronaut, top_k=2)
    assert len(top2) == 2 and top2[0]["score"] >= top2[1]["score"]
    assert len(classify(astronaut, top_k=50)) == 10  # clipped to num_labels


@pytest.mark.usefixtures("no_transformers_warnings")
def test_classification_batching_matches_one_by_one(classifier):
    classify = pipeline("image-classification", model=classifier, image_processor=classifier_processor())
    images = fashion_mnist_images(6)
    one_by_one = [as_scores(classify(image, top_k=10)) for image in images]
    # The pipeline splits every tuple of the model output along the batch (except `hidden_states` and `attentions`):
    # `kept_indices`, a tuple with one entry per pruning module, must stay out of the default output for this to work.
    batched = classify(images, top_k=10, batch_size=4)
    assert len(batched) == len(images)
    for single, in_batch in zip(one_by_one, map(as_scores, batched), strict=True):
        assert single.keys() == in_batch.keys()
        for label, score in single.items():
            assert in_batch[label] == pytest.approx(score, abs=1e-5)


@pytest.mark.usefixtures("no_transformers_warnings")
def test_multi_label_model_object_gives_sigmoid_scores(multi_label_classifier, chelsea):
    # The pipeline checks the model class against this table and logs "not supported" for a class it lacks.
    assert "CroprViTForMultiLabelClassification" in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES["cropr_vit"]
    classify = pipeline("image-classification", model=multi_label_classifier, image_processor=classifier_processor())
    scores = as_scores(classify(chelsea, top_k=5))
    expected = torch.sigmoid(reference_logits(multi_label_classifier, classifier_processor(), chelsea))
    labels = [multi_label_classifier.config.id2label[i] for i in range(5)]
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), expected)


@pytest.mark.usefixtures("no_transformers_warnings")
def test_multi_label_checkpoint_gives_independent_sigmoid_scores(multi_label_classifier, chelsea, tmp_path):
    multi_label_classifier.save_pretrained(tmp_path)
    classifier_processor().save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    assert classify.model.config.problem_type == "multi_label_classification"

    expected = torch.sigmoid(reference_logits(multi_label_classifier, classifier_processor(), chelsea))
    scores = as_scores(classify(chelsea, top_k=5))
    labels = [multi_label_classifier.config.id2label[i] for i in range(5)]
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), expected)
    assert sum(scores.values()) != pytest.approx(1.0, abs=1e-3)  # sigmoid, not softmax


@pytest.mark.usefixtures("no_transformers_warnings")
def test_stripped_checkpoint_serves_the_same_scores(classifier, chelsea, tmp_path):
    copy.deepcopy(classifier).strip_training_modules().save_pretrained(tmp_path)
    classifier_processor().save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    assert classify.model.config.inference_only is True
    expected = torch.softmax(reference_logits(classifier, classifier_processor(), chelsea), dim=-1)
    scores = as_scores(classify(chelsea, top_k=10))
    torch.testing.assert_close(torch.tensor([scores[label] for label in FASHION_LABELS]), expected)


@pytest.mark.usefixtures("no_transformers_warnings")
def test_segmentation_masks_per_present_class_at_input_size(segmenter, chelsea, tmp_path):
    segmenter.save_pretrained(tmp_path)
    segmentation_processor().save_pretrained(tmp_path)
    for model in (segmenter, str(tmp_path)):
        segment = (
            pipeline("image-segmentation", model=model, image_processor=segmentation_processor())
            if model is segmenter
            else pipeline("image-segmentation", model=model)
        )
        assert isinstance(segment.image_processor, SegformerImageProcessorPil)
        results = segment(chelsea)

        with torch.no_grad():
            logits = segmenter(**segmentation_processor()(images=chelsea, return_tensors="pt")).logits
        assert logits.shape[-2:] == (4, 4)  # patch resolution
        upsampled = torch.nn.functional.interpolate(
            logits, size=(chelsea.height, chelsea.width), mode="bilinear", align_corners=False
        )
        present = upsampled[0].argmax(dim=0).unique().tolist()
        assert [result["label"] for result in results] == [SEGMENTATION_LABELS[i] for i in present]

        coverage = np.zeros((chelsea.height, chelsea.width), dtype=int)
        for result in results:
            assert result["score"] is None
            assert result["mask"].mode == "L" and result["mask"].size == chelsea.size
            coverage += np.asarray(result["mask"]) > 0
        assert (coverage == 1).all()  # every pixel belongs to exactly one class mask


@pytest.mark.parametrize("task", ["image-classification", "image-segmentation"])
def test_empty_list_of_images_fails_in_transformers_as_for_every_model(task, classifier, segmenter):
    """transformers' `Pipeline.__call__` reads `inputs[0]` before any model code runs, for a plain ViT as for
    CroprViT; the task pipelines are transformers' own classes, so cropr has no hook on that path. When transformers
    changes this (an empty list in, an empty list out), this test fails and the README note on it can go."""
    if task == "image-classification":
        run = pipeline(task, model=classifier, image_processor=classifier_processor())
    else:
        run = pipeline(task, model=segmenter, image_processor=segmentation_processor())
    with pytest.raises(IndexError):
        run([])
