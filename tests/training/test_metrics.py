"""Metrics against small examples worked out by hand (the expected numbers are derived in the comments)."""

import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from cropr.training.metrics import (
    ClassificationMetrics,
    MultiLabelMetrics,
    SegmentationMetrics,
    accuracy,
    average_precision,
    compute_metrics_for_task,
    confusion_matrix,
    mean_average_precision,
    mean_iou,
    multilabel_f1,
    top_k_accuracy,
)

# Scores of 3 examples over 4 classes; true classes 2, 3, 0.
LOGITS = np.array([[0.1, 0.5, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1], [0.2, 0.2, 0.9, 0.0]])
TARGETS = np.array([2, 3, 0])


def test_accuracy():
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError):
        accuracy(np.array([0, 1]), np.array([0]))


def test_top_k_accuracy():
    # Classes scoring strictly higher than the true one: example 1: one (0.5); example 2: three; example 3: one
    # (0.9; class 1 ties with the true class 0 and does not count).
    assert top_k_accuracy(LOGITS, TARGETS, k=1) == 0.0
    assert top_k_accuracy(LOGITS, TARGETS, k=2) == pytest.approx(2 / 3)
    assert top_k_accuracy(LOGITS, TARGETS, k=4) == 1.0
    assert top_k_accuracy(LOGITS, TARGETS, k=5) == 1.0  # k beyond the number of classes
    with pytest.raises(ValueError, match="k must be"):
        top_k_accuracy(LOGITS, TARGETS, k=0)


def test_mean_iou_with_ignored_and_absent_classes():
    predictions = np.array([[[0, 0, 1], [1, 2, 2]]])
    references = np.array([[[0, 1, 1], [255, 2, 0]]])
    # Five valid pixels (prediction, label): (0,0) (0,1) (1,1) (2,2) (2,0); the ignored one predicted 1 counts nowhere.
    # class 0: intersection 1, predicted 2, labelled 2 -> IoU 1/3; class 1: 1, 1, 2 -> 1/2; class 2: 1, 2, 1 -> 1/2;
    # class 3: in neither -> nan, left out of the mean (1/3 + 1/2 + 1/2) / 3 = 4/9. Pixel accuracy 3/5.
    scores = mean_iou(predictions, references, num_labels=4)
    np.testing.assert_allclose(scores["per_category_iou"], [1 / 3, 1 / 2, 1 / 2, np.nan])
    assert scores["mean_iou"] == pytest.approx(4 / 9)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)


def test_class_only_predicted_counts_as_zero():
    # Label 0 predicted as 3: both classes have a union of 1 and an intersection of 0.
    scores = mean_iou(np.array([[3, 1]]), np.array([[0, 1]]), num_labels=4)
    np.testing.assert_allclose(scores["per_category_iou"], [0.0, 1.0, np.nan, 0.0])
    assert scores["mean_iou"] == pytest.approx(1 / 3)
    assert scores["pixel_accuracy"] == 0.5


def test_confusion_matrix_and_range_checks():
    confusion = confusion_matrix(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 255]), num_labels=2)
    np.testing.assert_array_equal(confusion, [[1, 1], [0, 1]])
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(np.array([2]), np.array([0]), num_labels=2)
    with pytest.raises(ValueError, match="references"):
        confusion_matrix(np.array([0]), np.array([7]), num_labels=2)
    assert math.isnan(mean_iou(np.array([1]), np.array([255]), num_labels=2)["pixel_accuracy"])


def test_average_precision():
    # Ranked: positive, negative, positive, negative: precision at the positives 1/1 and 2/3 -> (1 + 2/3) / 2.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # The positive ties with a negative: they are ranked together, precision 1/3 when recall reaches 1.
    assert average_precision(np.array([0.9, 0.5, 0.5]), np.array([0, 1, 0])) == pytest.approx(1 / 3)
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.5], [0.6, 0.4, 0.5]])
    targets = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    # class 0: 5/6 (above); class 1: its only positive ranks first -> 1; class 2: no positive, left out.
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1) / 2)


def test_multilabel_f1():
    probabilities = np.array([[0.9, 0.2, 0.6, 0.1], [0.4, 0.7, 0.1, 0.1], [0.8, 0.3, 0.2, 0.1]])
    targets = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    # class 0: TP 1, FP 1, FN 1 -> F1 2/4; class 1: TP 1 -> 1; class 2: FP 1 -> 0; class 3: nothing -> left out.
    # micro: TP 2, FP 2, FN 1 -> 4 / 7.
    scores = multilabel_f1(probabilities, targets)
    assert scores["macro_f1"] == pytest.approx(0.5)
    assert scores["micro_f1"] == pytest.approx(4 / 7)
    # A probability equal to the threshold is a positive prediction.
    assert multilabel_f1(np.array([[0.5]]), np.array([[1]]))["micro_f1"] == 1.0
    assert math.isnan(multilabel_f1(np.array([[0.1]]), np.array([[0]]))["macro_f1"])


def test_classification_compute_metrics_takes_the_first_output():
    kept_indices = np.zeros((3, 2))
    metrics = ClassificationMetrics(top_k=2)(EvalPrediction(predictions=(LOGITS, kept_indices), label_ids=TARGETS))
    # Argmax: 1, 0, 2 against 2, 3, 0 -> no hit; top-2 as above.
    assert metrics == {"accuracy": 0.0, "top2_accuracy": pytest.approx(2 / 3)}
    assert ClassificationMetrics()(EvalPrediction(LOGITS, np.array([1, 0, 2])))["accuracy"] == 1.0


def test_multilabel_compute_metrics_thresholds_sigmoid_at_half():
    logits = np.array([[2.0, -1.0], [0.0, -3.0], [-2.0, 1.0]])
    labels = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    # Logit 0 is probability 0.5: predicted present. class 0: TP 1, FP 1 -> 2/3; class 1: TP 1 -> 1.
    metrics = MultiLabelMetrics()(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["micro_f1"] == pytest.approx(4 / 5)
    assert metrics["mAP"] == 1.0  # every positive outranks every negative of its class


def segmentation_logits() -> np.ndarray:
    """One image, 2 classes, a 1x2 patch grid: class 1 minus class 0 is -1 on the left patch and +3 on the right."""
    logits = np.zeros((1, 2, 1, 2), dtype=np.float32)
    logits[0, 1, 0] = [-1.0, 3.0]
    return logits


def test_segmentation_compute_metrics_upsamples_bilinearly():
    # Bilinear 2 -> 6 columns (half-pixel centres) samples the patches at x = 0, 0, 1/3, 2/3, 1, 1: class-1 margins
    # -1, -1, 1/3, 5/3, 3, 3 -> classes 0 0 1 1 1 1 (nearest neighbour would give 0 0 0 1 1 1). The label of the
    # last pixel is ignored (255), and -100 (Trainer's padding) as well.
    labels = np.array([[[0, 0, 1, 1, 1, 255], [0, 0, 1, 1, -100, 1]]])
    logits = np.repeat(segmentation_logits(), 2, axis=2)  # two rows of patches -> two identical label rows
    metrics = SegmentationMetrics(2, id2label={0: "background", 1: "T-shirt/top"})(EvalPrediction(logits, labels))
    assert metrics == {"mean_iou": 1.0, "pixel_accuracy": 1.0, "iou_background": 1.0, "iou_T_shirt_top": 1.0}


def test_segmentation_batches_accumulate_and_class_maps_are_accepted():
    metric = SegmentationMetrics(3)
    labels = np.array([[[0, 0, 1, 1, 2, 2]]])
    # First batch: logits as torch tensors (as with batch_eval_metrics); class 2 scores lowest everywhere, so the
    # prediction is 0 0 1 1 1 1 (see above).
    logits = np.concatenate([segmentation_logits(), np.full((1, 1, 1, 2), -9.0, np.float32)], axis=1)
    assert metric(EvalPrediction(torch.from_numpy(logits), torch.from_numpy(labels)), compute_result=False) == {}
    # Second batch: class maps at label size, all right.
    metrics = metric(EvalPrediction(np.array([[[0, 0, 1, 1, 2, 2]]]), labels), compute_result=True)
    # Over 12 pixels: class 0: intersection 4, predicted 4, labelled 4 -> 1; class 1: 4, 6, 4 -> 4/6;
    # class 2: 2, 2, 4 -> 2/4. Pixel accuracy 10/12.
    assert metrics["iou_0"] == 1.0 and metrics["iou_1"] == pytest.approx(2 / 3) and metrics["iou_2"] == 0.5
    assert metrics["mean_iou"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(10 / 12)
    # The state was reset after reporting.
    assert metric(EvalPrediction(np.array([[[2, 2]]]), np.array([[[2, 2]]])))["iou_2"] == 1.0


def test_segmentation_rejects_wrong_logits():
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        SegmentationMetrics(3)(EvalPrediction(segmentation_logits(), np.zeros((1, 2, 2), dtype=np.int64)))


def test_compute_metrics_for_task():
    assert isinstance(compute_metrics_for_task("cluttered-classification"), ClassificationMetrics)
    assert isinstance(compute_metrics_for_task("multi-label", threshold=0.3), MultiLabelMetrics)
    segmentation = compute_metrics_for_task("segmentation", id2label={0: "background", 1: "Bag"})
    assert isinstance(segmentation, SegmentationMetrics) and segmentation.num_labels == 2
    with pytest.raises(ValueError, match="num_labels"):
        compute_metrics_for_task("segmentation")
    with pytest.raises(ValueError, match="task"):
        compute_metrics_for_task("detection")


# A diverged model outputs nan (or inf) scores: they count as wrong, never as a guess argmax or a ranking makes of them.
def test_classification_counts_non_finite_rows_as_wrong():
    # np.argmax of a row holding nan is the nan's index: class 0 here, the true class of the second example.
    logits = np.array([[0.1, 0.9, 0.0], [np.nan, 0.2, 0.1], [np.inf, 0.0, 0.0]])
    labels = np.array([1, 0, 0])
    metrics = ClassificationMetrics(top_k=3)(EvalPrediction(logits, labels))
    # Only the first example is right; with k = 3 every finite example would be a top-k hit.
    assert metrics == {"accuracy": pytest.approx(1 / 3), "top3_accuracy": pytest.approx(1 / 3)}
    assert top_k_accuracy(logits, labels, k=5) == pytest.approx(1 / 3)


def test_average_precision_does_not_rank_non_finite_scores():
    # Finite ranking: negative (0.8), positive (0.7): precision 1/2 at half the recall; the positive scored nan is
    # never retrieved -> 1/2 * 1/2.
    assert average_precision(np.array([np.nan, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(0.25)
    assert average_precision(np.full(3, np.nan), np.array([1, 0, 1])) == 0.0
    assert math.isnan(average_precision(np.full(2, np.nan), np.array([0, 0])))  # still: no positive


def test_multilabel_metrics_of_a_diverged_model_are_zero():
    labels = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    nan_metrics = MultiLabelMetrics()(EvalPrediction(np.full((3, 2), np.nan), labels))
    assert nan_metrics == {"mAP": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}
    # Infinite logits have a finite sigmoid but are failed predictions too: each is the opposite of its label.
    inf_logits = np.where(labels > 0.5, -np.inf, np.inf)
    assert MultiLabelMetrics()(EvalPrediction(inf_logits, labels)) == {"mAP": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}
    # F1 alone: one finite right prediction (class 0 of example 0), the nan probability of class 1 counts as a miss.
    scores = multilabel_f1(np.array([[0.9, np.nan]]), np.array([[1, 1]]))
    assert scores == {"micro_f1": pytest.approx(2 / 3), "macro_f1": pytest.approx(0.5)}


def test_segmentation_counts_pixels_with_non_finite_logits_as_wrong():
    # Logits at label size (no upsampling), 2 classes, 3 pixels labelled 0 1 1. The middle pixel's class-1 logit is
    # nan, which torch's argmax would pick (right by chance): it counts as a miss of class 1.
    logits = np.array([[[[2.0, 0.0, 0.0]], [[0.0, np.nan, 1.0]]]], dtype=np.float32)
    labels = np.array([[[0, 1, 1]]])
    metrics = SegmentationMetrics(2)(EvalPrediction(logits, labels))
    # class 0: intersection 1, union 1; class 1: intersection 1, predicted 1, labelled 2 -> 1/2. Pixels right: 2/3.
    assert metrics == {"mean_iou": 0.75, "pixel_accuracy": pytest.approx(2 / 3), "iou_0": 1.0, "iou_1": 0.5}
    all_nan = SegmentationMetrics(2)(EvalPrediction(np.full_like(logits, np.nan), labels))
    assert all_nan == {"mean_iou": 0.0, "pixel_accuracy": 0.0, "iou_0": 0.0, "iou_1": 0.0}
