"""Evaluation metrics for the three tasks, computed locally with numpy.

Why not 🤗 `evaluate`: its metrics are scripts on the Hub (`evaluate.load("mean_iou")` fails offline), they take
whole arrays where `Trainer(batch_eval_metrics=True)` hands over one batch at a time, and none of them defines what a
non-finite prediction scores (below). These do all three, so the package does not depend on `evaluate`.

Functions on whole arrays:

- [`accuracy`], [`top_k_accuracy`] for single-label classification;
- [`mean_average_precision`] and [`multilabel_f1`] for multi-label classification;
- [`confusion_matrix`] and [`mean_iou`] for semantic segmentation (mean IoU, per-class IoU, pixel accuracy).

And callables for `Trainer(compute_metrics=...)`, one per task, built by [`compute_metrics_for_task`] or directly:
[`ClassificationMetrics`], [`MultiLabelMetrics`], [`SegmentationMetrics`]. They take an `EvalPrediction` (numpy
arrays, or tensors with `batch_eval_metrics=True`, in which case they accumulate over batches and report on the last
one), use its first prediction when the model returns several outputs, and return a dict of floats. Undefined values
(e.g. the IoU of a class absent from both predictions and labels) are `nan`.

Non-finite scores (`nan` or `inf`, as a diverged model produces) are failed predictions and count as wrong, never as
a guess: such an example is no hit in accuracy and top-k accuracy (whatever `argmax` would pick), a non-finite score is
ranked below every finite one and its positive is never retrieved in average precision, its multi-label prediction
is the opposite of its label in F1, and such a pixel counts against its true class in IoU and pixel accuracy. The
metrics thus stay the share of what the model got right: a model that outputs only `nan` scores 0.

Example:

```python
from transformers import Trainer
from cropr.training.metrics import compute_metrics_for_task

trainer = Trainer(model=model, args=args, compute_metrics=compute_metrics_for_task("segmentation", num_labels=11))
```
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

IGNORE_INDEX = 255
"""Label value excluded from segmentation metrics."""

PADDING_INDEX = -100
"""Value `Trainer` pads labels with when gathering batches of different shapes; also ignored."""


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        # numpy has no bfloat16; metrics need no more than float32 anyway.
        return (array.float() if array.is_floating_point() else array).numpy()
    return np.asarray(array)


def _main_output(predictions) -> np.ndarray:
    """The logits: models returning several outputs (e.g. kept token indices) give `Trainer` a tuple, logits first."""
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return _to_numpy(predictions)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (no overflow for large negative logits)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of predicted class ids equal to the reference ids.

    Args:
        predictions (`np.ndarray` of shape `(N,)`): predicted class ids.
        references (`np.ndarray` of shape `(N,)`): true class ids.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} must be equal 1-D shapes")
    if len(references) == 0:
        return float("nan")
    return float(np.mean(predictions == references))


def top_k_accuracy(logits: np.ndarray, references: np.ndarray, k: int = 5) -> float:
    """Fraction of examples whose true class is among the `k` highest scores.

    Ties count in favour of the true class: an example is correct when fewer than `k` classes score strictly higher
    than it. With `k` at least the number of classes, every example is correct.

    Args:
        logits (`np.ndarray` of shape `(N, C)`): scores (logits or probabilities).
        references (`np.ndarray` of shape `(N,)`): true class ids in `[0, C)`.
        k: how many top classes count.
    """
    hits = _top_k_hits(logits, references, k)
    return float(np.mean(hits)) if len(hits) else float("nan")


def _top_k_hits(logits: np.ndarray, references: np.ndarray, k: int) -> np.ndarray:
    """Per example, whether fewer than `k` classes score strictly higher than the true class."""
    logits, references = np.asarray(logits), np.asarray(references)
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    if logits.ndim != 2 or references.shape != (len(logits),):
        raise ValueError(f"logits must be (N, C) and references (N,); got {logits.shape} and {references.shape}")
    true_scores = np.take_along_axis(logits, references[:, None].astype(np.int64), axis=1)
    return (np.sum(logits > true_scores, axis=1) < k) & _finite_rows(logits)


def _finite_rows(logits: np.ndarray) -> np.ndarray:
    """Per example, whether all its scores are finite (the others are failed predictions, counted as wrong)."""
    return np.isfinite(logits).all(axis=-1)


def confusion_matrix(
    predictions: np.ndarray, references: np.ndarray, num_labels: int, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """Pixel (or example) counts by true class (rows) and predicted class (columns).

    Args:
        predictions: predicted class ids, any shape.
        references: true class ids, same shape; pixels equal to `ignore_index` are left out.
        num_labels: number of classes `C`.
        ignore_index: label value to skip, or `None`.

    Returns:
        `np.ndarray` of shape `(C, C)`, `int64`.

    Raises:
        ValueError: shapes differ, or a prediction or (non-ignored) label is outside `[0, C)`.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
    valid = references != ignore_index if ignore_index is not None else np.ones(references.shape, dtype=bool)
    predictions, references = predictions[valid].astype(np.int64), references[valid].astype(np.int64)
    _check_class_ids("references", references, num_labels)
    _check_class_ids("predictions", predictions, num_labels)
    counts = np.bincount(references * num_labels + predictions, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def _check_class_ids(name: str, values: np.ndarray, num_labels: int) -> None:
    if values.size and (values.min() < 0 or values.max() >= num_labels):
        raise ValueError(f"{name} hold class ids outside [0, {num_labels}): {values.min()}..{values.max()}")


def iou_from_confusion(confusion: np.ndarray, missed: np.ndarray | None = None) -> dict[str, float | np.ndarray]:
    """Segmentation scores from a confusion matrix (rows: true class, columns: predicted class).

    Returns:
        `mean_iou`: mean of the per-class IoU over classes present in the labels or the predictions;
        `per_category_iou` (`np.ndarray` of shape `(C,)`): intersection over union, `nan` for a class absent from
        both; `pixel_accuracy`: fraction of (non-ignored) pixels predicted right. Like `evaluate`'s `mean_iou`
        with `nan_to_num=None`: areas are summed over all images before dividing.

    Args:
        confusion (`np.ndarray` of shape `(C, C)`): pixel counts by true and predicted class.
        missed (`np.ndarray` of shape `(C,)`, *optional*): per true class, pixels without a valid prediction
            (non-finite logits); they count as wrong, in the union of their true class and in the pixel total.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    missed = np.zeros(len(confusion)) if missed is None else np.asarray(missed, dtype=np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) + missed - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        per_category_iou = intersection / union
    present = union > 0
    total = confusion.sum() + missed.sum()
    return {
        "mean_iou": float(per_category_iou[present].mean()) if present.any() else float("nan"),
        "per_category_iou": per_category_iou,
        "pixel_accuracy": float(intersection.sum() / total) if total else float("nan"),
    }


def mean_iou(
    predictions: np.ndarray, references: np.ndarray, num_labels: int, ignore_index: int | None = IGNORE_INDEX
) -> dict[str, float | np.ndarray]:
    """Mean IoU, per-class IoU and pixel accuracy of class maps; see [`iou_from_confusion`] for the definitions.

    Args:
        predictions (`np.ndarray` of shape `(N, H, W)`): predicted class ids.
        references (`np.ndarray` of shape `(N, H, W)`): true class ids, `ignore_index` for pixels to skip.
        num_labels: number of classes.
        ignore_index: label value to skip (255 by default), or `None`.
    """
    return iou_from_confusion(confusion_matrix(predictions, references, num_labels, ignore_index))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one binary problem: the sum over score thresholds of the recall gained times precision.

    Examples with equal scores are ranked together (as scikit-learn's `average_precision_score`). `nan` when there
    is no positive. Non-finite scores are failed predictions: left out of the ranking, so a positive with such a
    score is never retrieved (all scores non-finite: 0).

    Args:
        scores (`np.ndarray` of shape `(N,)`): higher means more likely positive.
        targets (`np.ndarray` of shape `(N,)`): 1 for positives, 0 for negatives.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    num_positives = targets.sum()
    if num_positives == 0:
        return float("nan")
    finite = np.isfinite(scores)
    if not finite.any():
        return 0.0
    scores, targets = scores[finite], targets[finite]
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    # The last position of each run of equal scores: precision and recall are only defined between distinct scores.
    thresholds = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    true_positives = np.cumsum(targets)[thresholds]
    precision = true_positives / (thresholds + 1)
    recall_gain = np.diff(true_positives, prepend=0) / num_positives
    return float(np.sum(recall_gain * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of [`average_precision`], leaving out classes without any positive (`nan` if all lack one).

    Args:
        scores (`np.ndarray` of shape `(N, C)`): per-class scores (logits or probabilities: only their order counts).
        targets (`np.ndarray` of shape `(N, C)`): multi-hot labels.
    """
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be equal (N, C) shapes")
    per_class = np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    defined = ~np.isnan(per_class)
    return float(per_class[defined].mean()) if defined.any() else float("nan")


def multilabel_f1(probabilities: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Micro and macro F1 of multi-label predictions `probabilities >= threshold`.

    Micro F1 pools true/false positives and false negatives over all classes: `2 TP / (2 TP + FP + FN)`. Macro F1
    averages the per-class F1 over classes where it is defined, i.e. with at least one positive label or prediction.
    Either is `nan` when nothing is positive in labels or predictions. A non-finite probability is a failed
    prediction, counted as wrong (the opposite of its label).

    Args:
        probabilities (`np.ndarray` of shape `(N, C)`): per-class probabilities (apply [`sigmoid`] to logits).
        targets (`np.ndarray` of shape `(N, C)`): multi-hot labels.
        threshold: probability from which a class is predicted present.
    """
    probabilities, targets = np.asarray(probabilities), np.asarray(targets)
    if probabilities.shape != targets.shape or probabilities.ndim != 2:
        raise ValueError(f"probabilities {probabilities.shape} and targets {targets.shape} must be equal (N, C)")
    actual = targets > 0.5
    predicted = np.where(np.isfinite(probabilities), probabilities >= threshold, ~actual)
    true_positives = np.sum(predicted & actual, axis=0)
    errors = np.sum(predicted != actual, axis=0)  # false positives + false negatives, per class
    denominator = 2 * true_positives + errors
    defined = denominator > 0
    micro = 2 * true_positives.sum() / denominator.sum() if denominator.sum() else float("nan")
    macro = float(np.mean(2 * true_positives[defined] / denominator[defined])) if defined.any() else float("nan")
    return {"micro_f1": float(micro), "macro_f1": macro}


def _metric_name(name: str) -> str:
    """A label name usable in a metric key (no `/`, which logging backends read as a hierarchy)."""
    return re.sub(r"\W+", "_", str(name)).strip("_")


class TaskMetrics(ABC):
    """Base of the `compute_metrics` callables: accumulate with `update`, report with `compute`, then reset.

    `Trainer` calls it once with the whole evaluation set, or, with `batch_eval_metrics=True`, once per batch with
    `compute_result` true on the last one.
    """

    def __init__(self) -> None:
        self.reset()

    @abstractmethod
    def reset(self) -> None:
        """Forget what was accumulated."""

    @abstractmethod
    def update(self, predictions, labels) -> None:
        """Accumulate one batch (numpy arrays or tensors)."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over everything accumulated since the last reset."""

    def __call__(self, eval_prediction: EvalPrediction, compute_result: bool = True) -> dict[str, float]:
        self.update(_main_output(eval_prediction.predictions), _to_numpy(eval_prediction.label_ids))
        if not compute_result:
            return {}
        try:
            return self.compute()
        finally:
            self.reset()


class ClassificationMetrics(TaskMetrics):
    """`compute_metrics` for single-label classification: `accuracy` and `top{k}_accuracy` from `(N, C)` logits.

    Args:
        top_k: the `k` of the top-k accuracy (5 by default).
    """

    def __init__(self, top_k: int = 5) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {top_k}")
        self.top_k = top_k
        super().__init__()

    def reset(self) -> None:
        self._num_correct = self._num_top_k = self._count = 0

    def update(self, predictions, labels) -> None:
        logits, labels = _to_numpy(predictions), _to_numpy(labels).astype(np.int64)
        self._num_correct += int(np.sum((logits.argmax(axis=-1) == labels) & _finite_rows(logits)))
        self._num_top_k += int(np.sum(_top_k_hits(logits, labels, self.top_k)))
        self._count += len(labels)

    def compute(self) -> dict[str, float]:
        if self._count == 0:
            return {"accuracy": float("nan"), f"top{self.top_k}_accuracy": float("nan")}
        return {
            "accuracy": self._num_correct / self._count,
            f"top{self.top_k}_accuracy": self._num_top_k / self._count,
        }


class MultiLabelMetrics(TaskMetrics):
    """`compute_metrics` for multi-label classification: `mAP`, `micro_f1` and `macro_f1` from `(N, C)` logits.

    F1 scores predict a class present where its sigmoid probability is at least `threshold`.

    Args:
        threshold: the probability threshold (0.5 by default, i.e. logits >= 0).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a probability strictly between 0 and 1; got {threshold}")
        self.threshold = threshold
        super().__init__()

    def reset(self) -> None:
        # Average precision ranks all examples together, so the scores are kept until `compute`.
        self._logits: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, predictions, labels) -> None:
        self._logits.append(_to_numpy(predictions))
        self._labels.append(_to_numpy(labels))

    def compute(self) -> dict[str, float]:
        if not self._logits:
            return {"mAP": float("nan"), "micro_f1": float("nan"), "macro_f1": float("nan")}
        logits, labels = np.concatenate(self._logits), np.concatenate(self._labels)
        # An infinite logit is a failed prediction too, although its sigmoid is finite.
        probabilities = sigmoid(np.where(np.isfinite(logits), logits, np.nan))
        return {
            "mAP": mean_average_precision(logits, labels),
            **multilabel_f1(probabilities, labels, self.threshold),
        }


class SegmentationMetrics(TaskMetrics):
    """`compute_metrics` for semantic segmentation: `mean_iou`, `pixel_accuracy` and one `iou_<label>` per class.

    Predictions are either logits `(N, C, h, w)`, at patch resolution, upsampled bilinearly to the label size
    (as the model's loss does) before the argmax, or class maps `(N, H, W)` (e.g. from a
    `preprocess_logits_for_metrics` that takes the argmax to save memory). Label pixels equal to `ignore_index`, or
    to -100 (`Trainer`'s padding), are left out. Per-class IoU is `nan` for a class absent from both predictions and
    labels, and such classes are left out of `mean_iou`. A pixel whose (upsampled) logits are not all finite counts
    as wrong: against its true class's IoU and the pixel accuracy.

    Args:
        num_labels: number of classes `C`.
        ignore_index: label value to skip (255 by default).
        id2label: class names for the per-class keys (`iou_background`, ...); class ids are used without it.
        chunk_size: images upsampled at once, bounding memory to `chunk_size * C * H * W` floats.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = IGNORE_INDEX,
        id2label: Mapping[int, str] | None = None,
        chunk_size: int = 32,
    ) -> None:
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2; got {num_labels}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1; got {chunk_size}")
        names = [id2label[i] if id2label is not None else i for i in range(num_labels)]
        self.metric_names = [f"iou_{_metric_name(name)}" for name in names]
        if len(set(self.metric_names)) != num_labels:
            raise ValueError(f"id2label gives clashing metric names: {self.metric_names}")
        self.num_labels, self.ignore_index, self.chunk_size = num_labels, ignore_index, chunk_size
        super().__init__()

    def reset(self) -> None:
        self._confusion = np.zeros((self.num_labels, self.num_labels), dtype=np.int64)
        self._missed = np.zeros(self.num_labels, dtype=np.int64)  # per true class, pixels with non-finite logits

    def _class_maps(self, predictions: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class per pixel, and where the logits are not all finite (failed predictions)."""
        if predictions.ndim == 3:
            return predictions, np.zeros(predictions.shape, dtype=bool)
        if predictions.ndim != 4 or predictions.shape[1] != self.num_labels:
            raise ValueError(
                f"segmentation predictions must be logits (N, {self.num_labels}, h, w) or class maps (N, H, W); "
                f"got shape {predictions.shape}"
            )
        maps, failed = [], []
        with torch.no_grad():
            for start in range(0, len(predictions), self.chunk_size):
                logits = torch.from_numpy(np.ascontiguousarray(predictions[start : start + self.chunk_size]))
                if tuple(logits.shape[-2:]) != size:
                    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
                maps.append(logits.argmax(dim=1).numpy())
                failed.append((~torch.isfinite(logits).all(dim=1)).numpy())
        return np.concatenate(maps), np.concatenate(failed)

    def update(self, predictions, labels) -> None:
        predictions, labels = _to_numpy(predictions), _to_numpy(labels)
        if labels.ndim != 3:
            raise ValueError(f"segmentation labels must be (N, H, W); got shape {labels.shape}")
        labels = np.where(labels == PADDING_INDEX, self.ignore_index, labels)
        class_maps, failed = self._class_maps(predictions, labels.shape[-2:])
        self._confusion += confusion_matrix(class_maps[~failed], labels[~failed], self.num_labels, self.ignore_index)
        missed = labels[failed & (labels != self.ignore_index)].astype(np.int64)
        _check_class_ids("references", missed, self.num_labels)
        self._missed += np.bincount(missed, minlength=self.num_labels)

    def compute(self) -> dict[str, float]:
        scores = iou_from_confusion(self._confusion, self._missed)
        per_class = dict(zip(self.metric_names, map(float, scores["per_category_iou"]), strict=True))
        return {"mean_iou": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"], **per_class}


def compute_metrics_for_task(
    task: str,
    *,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    top_k: int = 5,
    threshold: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> TaskMetrics:
    """The `compute_metrics` callable for a built-in task.

    Args:
        task: `"cluttered-classification"` (or `"classification"`), `"multi-label"` or `"segmentation"`.
        num_labels: number of classes, needed for segmentation (defaults to `len(id2label)`).
        id2label: class names, used for segmentation's per-class keys.
        top_k: `k` of the top-k accuracy (classification).
        threshold: probability threshold of the F1 scores (multi-label).
        ignore_index: label value skipped (segmentation).

    Returns:
        A [`ClassificationMetrics`], [`MultiLabelMetrics`] or [`SegmentationMetrics`].
    """
    if task in ("cluttered-classification", "classification"):
        return ClassificationMetrics(top_k=top_k)
    if task == "multi-label":
        return MultiLabelMetrics(threshold=threshold)
    if task == "segmentation":
        if num_labels is None:
            if id2label is None:
                raise ValueError("num_labels (or id2label) is required for the segmentation task")
            num_labels = len(id2label)
        return SegmentationMetrics(num_labels, ignore_index=ignore_index, id2label=id2label)
    raise ValueError(f"task must be one of cluttered-classification, multi-label, segmentation; got {task!r}")
