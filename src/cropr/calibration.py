"""Label-free calibration: train only the Cropr modules of a frozen model, on its own unpruned predictions.

The routers of a CroprViT never change the backbone (they read its tokens through a stop-gradient), so they can be
trained after the fact on a frozen model: each image runs once through the model with pruning off, under
`torch.no_grad()`, and every Cropr module learns, through its auxiliary head, to predict from the tokens of its block
what the whole model predicts (soft class probabilities for classification and multi-label, each patch's class
probabilities for segmentation, the pooled embedding for a bare backbone), or the labels when the data has them. The
same passes fit each module a second scorer, a linear read-out of patch contrast ([`ContrastReadout`]); after training,
mixes of the two prune some of the images, and the mix that changes fewest of the unpruned model's predictions is kept.
No backward pass enters the backbone or the head; their weights stay bit-identical. The result is saved as a stripped
inference checkpoint.

```python
>>> from cropr.calibration import calibrate
>>> result = calibrate("path/to/croprvit-checkpoint", "path/to/images", "calibrated", epochs=2)
>>> result.model.set_pruning_rate(8)  # any rate its modules serve
```

`cropr calibrate SOURCE --images DIR_OR_DATASET --output-dir DIR` runs it from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, PreTrainedModel
from transformers.image_processing_base import ImageProcessingMixin
from transformers.utils import logging as transformers_logging

from .contrast_readout import ContrastReadout, mixed_query
from .data.formats import IMAGE_COLUMNS
from .data.images import to_rgb
from .models.cropr_vit.configuration_cropr_vit import LEARNED_SELECTORS, CroprViTConfig
from .models.cropr_vit.modeling_cropr_vit import (
    CroprViTForSemanticSegmentation,
    CroprViTModel,
    CroprViTPreTrainedModel,
    check_classification_labels,
    check_segmentation_labels,
)
from .tools.argtypes import (
    DefaultsHelpFormatter,
    bounded_int,
    output_dir,
    parse_image_size,
    parse_schedule,
    parse_shares,
)

STATE_FILE = "calibration_state.safetensors"
"""Written into the output folder every `save_steps` steps, and removed once the calibrated checkpoint is saved."""
SUMMARY_FILE = "calibration.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Configuration fields that a calibration may change on a CroprViT source (which modules exist and where).
SCHEDULE_FIELDS = ("pruning_rate", "pruning_schedule")
CONTRAST_WEIGHTS = (0.0, 0.5, 1.0)
"""Shares of the contrast read-out ([`ContrastReadout`]) in the scorers that a calibration compares."""
SELECTION_IMAGES = 256
"""Images (the first epoch's first ones) on which the mixes are compared, by default."""
SELECTION_FRACTIONS = (1 / 3, 2 / 3, 1.0)
"""Fractions of the calibrated schedule at which the compared scorers prune: the speed dial runs lighter ones too."""


@dataclass
class CalibrationResult:
    """What [`calibrate`] produced: the calibrated model (stripped, eval mode) and its image processor, what the
    run did, the mean auxiliary loss of its first and last tenth of steps, the share of the contrast read-out in the
    scorers it kept, and how far each compared share's pruned predictions moved from the unpruned ones
    ([`prediction_change`], by share)."""

    model: CroprViTPreTrainedModel
    image_processor: ImageProcessingMixin
    steps: int
    num_images: int
    seconds: float
    first_loss: float
    last_loss: float
    output_dir: str | None
    contrast_weight: float
    prediction_changes: dict[float, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list, repr=False)


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------
class CalibrationImages:
    """Images (and optional labels) to calibrate on: a folder of image files (searched recursively), a `datasets`
    `Dataset`, or the name of a dataset (Hub id or local folder of parquet / CSV / JSON files; its train split)."""

    def __init__(self, images: str | os.PathLike | Any, label_column: str | None = None):
        self.label_column = label_column
        self.files: list[Path] | None = None
        self.dataset = None
        if isinstance(images, (str, os.PathLike)) and Path(images).is_dir() and _image_files(Path(images)):
            if label_column is not None:
                raise ValueError(f"{images} is a folder of image files, which has no label column {label_column!r}")
            self.files = _image_files(Path(images))
            return
        if isinstance(images, (str, os.PathLike)):
            from datasets import load_dataset

            dataset = load_dataset(str(images))
            if "train" not in dataset:
                raise ValueError(f"the dataset {images} has no train split (splits: {list(dataset)})")
            images = dataset["train"]
        columns = list(getattr(images, "column_names", []))
        image_column = next((name for name in IMAGE_COLUMNS if name in columns), None)
        if image_column is None:
            raise ValueError(f"found no images: the dataset has no column {IMAGE_COLUMNS} (columns: {columns})")
        if label_column is not None and label_column not in columns:
            raise ValueError(f"the dataset has no label column {label_column!r} (columns: {columns})")
        self.dataset, self.image_column = images, image_column
        if len(images) == 0:
            raise ValueError("the dataset holds no images")

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.dataset)

    def batch(self, indices: Sequence[int]) -> tuple[list[Image.Image], list | None]:
        """The RGB images at `indices`, and their labels when a label column was given."""
        if self.files is not None:
            images = []
            for index in indices:
                with Image.open(self.files[index]) as image:
                    images.append(to_rgb(image))
            return images, None
        rows = self.dataset[list(indices)]
        images = [
            to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
            for image in rows[self.image_column]
        ]
        return images, (rows[self.label_column] if self.label_column else None)


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


# ----------------------------------------------------------------------------------------------------------------------
# The model to calibrate
# ----------------------------------------------------------------------------------------------------------------------
def load_for_calibration(
    source: str | os.PathLike | PreTrainedModel,
    task: str | None = None,
    image_processor: ImageProcessingMixin | str | None = None,
    **overrides: Any,
) -> tuple[CroprViTPreTrainedModel, ImageProcessingMixin, dict[str, Any]]:
    """The model whose Cropr modules [`calibrate`] trains, its image processor, and the schedule overrides left to
    apply to it ([`with_training_modules`]).

    `source` is a CroprViT model or checkpoint (its head is kept), or a source that `from_backbone` converts (a Hub
    id, a folder or a transformers model object): as "image-classification" when it is an image classifier whose
    head `from_backbone` keeps (`ViTForImageClassification`, `Dinov2ForImageClassification`,
    `CLIPForImageClassification`, ...; the default for such a source), or as "feature-extraction" (the default for
    any other; targets: the pooled embedding); any other converted head would be untrained, with no predictions to
    learn.
    `overrides` are `pruning_rate` / `pruning_schedule`, and for a source to convert any other
    `from_backbone` option.
    """
    if isinstance(source, CroprViTPreTrainedModel):
        model = source
    elif (
        not isinstance(source, PreTrainedModel)
        and AutoConfig.from_pretrained(source).model_type == CroprViTConfig.model_type
    ):
        from .cli import _model_class

        model = _model_class(CroprViTConfig.from_pretrained(source)).from_pretrained(source)
        image_processor = image_processor if image_processor is not None else source
    else:
        from .conversion import from_backbone, source_classifier

        if task is None:
            from_pretrained_kwargs = overrides.get("from_pretrained_kwargs") or {}
            keeps_head = source_classifier(source, **from_pretrained_kwargs) is not None
            task = "image-classification" if keeps_head else "feature-extraction"
        if task not in ("feature-extraction", "image-classification"):
            raise ValueError(
                f"{source} is not a CroprViT checkpoint: converted, its {task} head would be untrained, so its "
                "predictions cannot teach the Cropr modules. Calibrate it as feature-extraction (targets: its pooled "
                "embedding) or, for an image classifier, as image-classification (its own head is kept); or train a "
                "head first and calibrate that CroprViT checkpoint."
            )
        # An image classifier keeps its own head (a source without one cannot be calibrated on predictions).
        keep_head = True if task == "image-classification" else None
        model, converted_processor = from_backbone(source, task, keep_head=keep_head, **overrides)
        image_processor = image_processor if image_processor is not None else converted_processor
        overrides = {}
    if task is not None:
        from .conversion import CONVERSION_TASKS

        if not isinstance(model, CONVERSION_TASKS[task]):
            raise ValueError(f"the source is a {type(model).__name__}, not a {task} model")
    unknown = sorted(set(overrides) - set(SCHEDULE_FIELDS))
    if unknown:
        raise ValueError(
            f"{unknown} apply to a backbone being converted; a CroprViT source takes only {SCHEDULE_FIELDS}"
        )
    if model.config.token_selector not in LEARNED_SELECTORS:
        raise ValueError(
            f"the model's token selector {model.config.token_selector!r} has no Cropr modules to calibrate; convert "
            'or load it with token_selector="cropr"'
        )
    if image_processor is None:
        raise ValueError("pass the model's `image_processor` (a model object carries none)")
    if isinstance(image_processor, (str, os.PathLike)):
        image_processor = AutoImageProcessor.from_pretrained(image_processor)
    return model, image_processor, overrides


def with_training_modules(
    model: CroprViTPreTrainedModel, overrides: dict[str, Any] | None = None
) -> CroprViTPreTrainedModel:
    """A copy of `model` with full Cropr modules, its own where it has them and fresh ones elsewhere (a stripped
    model has only their aggregated queries), and the schedule `overrides`. A bare backbone's auxiliary heads
    predict the pooled embedding, so they get one output per feature."""
    # As overrides of `from_dict`, the schedule is read as `from_pretrained` reads it (a rate replaces a saved
    # explicit schedule), with modules exactly where it prunes.
    overrides = {**overrides, "router_blocks": None} if overrides else {}
    config_dict = {**model.config.to_dict(), "inference_only": False}
    if isinstance(model, CroprViTModel):
        config_dict.pop("id2label", None)
        config_dict.pop("label2id", None)
        config_dict["num_labels"] = model.config.hidden_size
    variant = type(model)(CroprViTConfig.from_dict(config_dict, **overrides))
    own = variant.state_dict()
    fitting = {key: value for key, value in model.state_dict().items() if key in own and own[key].shape == value.shape}
    variant.load_state_dict(fitting, strict=False)
    variant.refresh_routers()
    return variant.to(device=model.device, dtype=model.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Targets and losses
# ----------------------------------------------------------------------------------------------------------------------
def problem_type(model: CroprViTPreTrainedModel) -> str:
    """What a task head predicts, as transformers names it; "embedding" for a bare backbone."""
    if isinstance(model, CroprViTModel):
        return "embedding"
    if isinstance(model, CroprViTForSemanticSegmentation):
        return "segmentation"
    if model.config.problem_type is not None:
        return model.config.problem_type
    return "regression" if model.config.num_labels == 1 else "single_label_classification"


@torch.no_grad()
def calibration_targets(
    model: CroprViTPreTrainedModel, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None]:
    """One forward pass of `model` with pruning off: (each block's output, the targets, the mask of targets to learn).

    Targets are the model's own predictions (softmax or sigmoid probabilities of a classifier, per-patch class
    probabilities of a segmenter, the pooled embedding of a bare backbone), or `labels` when given (class ids,
    multi-hot rows, or segmentation maps). The mask, for segmentation, drops the patches whose target class is in
    `aux_ignored_labels` (or whose label is the ignore index); `None` elsewhere.
    """
    config, kind = model.config, problem_type(model)
    if labels is not None:
        # Checked as the model's own loss checks them: a bad label fails here by name, not inside `one_hot`.
        if kind == "embedding":
            raise ValueError("a bare backbone has no classes to learn labels of: calibrate it without a label column")
        if kind == "segmentation":
            check_segmentation_labels(labels, pixel_values, config.num_labels, config.semantic_loss_ignore_index)
        else:
            check_classification_labels(labels, kind, config.num_labels, len(pixel_values))
    with unpruned(model):
        output = model(pixel_values, output_hidden_states=True)
    if labels is None:
        targets = model_predictions(model, output)
        mask = None
        if kind == "segmentation":
            ignored = torch.tensor(config.aux_ignored_labels or [], device=targets.device)
            mask = ~torch.isin(targets.argmax(-1), ignored)
        return output.hidden_states, targets, mask
    if kind == "segmentation":
        ignore_index = config.semantic_loss_ignore_index
        num_patches = output.logits.shape[-2] * output.logits.shape[-1]
        patch_labels = model._patch_labels(labels, output.logits.shape[-2:], num_patches, pixel_values)
        patch_labels = patch_labels.view(len(labels), num_patches)
        mask = patch_labels != ignore_index
        return output.hidden_states, F.one_hot(patch_labels.masked_fill(~mask, 0), config.num_labels).float(), mask
    if kind in ("regression", "multi_label_classification"):
        return output.hidden_states, labels.float(), None
    return output.hidden_states, F.one_hot(labels.long(), config.num_labels).float(), None


def model_predictions(model: CroprViTPreTrainedModel, output: Any) -> torch.Tensor:
    """What the model predicts in `output`, as calibration targets: softmax probabilities of a classifier (per patch
    `(B, patches, C)` for a segmenter), sigmoid probabilities for multi-label, the logits of a regressor, the pooled
    embedding of a bare backbone."""
    kind = problem_type(model)
    if kind == "embedding":
        return output.pooler_output
    if kind == "segmentation":
        return output.logits.float().softmax(dim=1).flatten(2).transpose(1, 2)
    if kind == "regression":
        return output.logits
    if kind == "multi_label_classification":
        return output.logits.sigmoid()
    return output.logits.float().softmax(dim=-1)


def prediction_change(model: CroprViTPreTrainedModel, output: Any, targets: torch.Tensor) -> torch.Tensor:
    """How far the predictions in `output` moved from the unpruned ones, `targets` ([`model_predictions`]), per image:
    the share of the model's decisions that changed (the class, each patch's class, each label's yes or no), or the
    mean squared difference of a bare backbone's embedding or a regressor's outputs."""
    kind = problem_type(model)
    if kind in ("embedding", "regression"):
        outputs = output.pooler_output if kind == "embedding" else output.logits
        return (outputs.float() - targets.float()).pow(2).flatten(1).mean(dim=1)
    if kind == "multi_label_classification":
        return ((output.logits > 0) != (targets > 0.5)).float().mean(dim=1)
    if kind == "segmentation":
        return (output.logits.argmax(dim=1).flatten(1) != targets.argmax(dim=-1)).float().mean(dim=1)
    return (output.logits.argmax(dim=-1) != targets.argmax(dim=-1)).float()


def auxiliary_loss(
    model: CroprViTPreTrainedModel, aux_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """How far one Cropr module's auxiliary head `(B, num_queries, outputs)` is from the targets: the KL divergence
    from the target class distribution (per patch for segmentation, over the unmasked patches; the cross-entropy for
    labels), binary cross-entropy for multi-label, mean squared error for embeddings and regression. The divergence,
    unlike the soft cross-entropy, is 0 for a head that matches the model, whatever the targets' own entropy."""
    aux_logits, kind = aux_logits.float(), problem_type(model)
    if kind == "segmentation":
        per_patch = F.kl_div(aux_logits.log_softmax(dim=-1), targets, reduction="none").sum(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)
    targets = targets.unsqueeze(1).expand_as(aux_logits)
    if kind in ("embedding", "regression"):
        return F.mse_loss(aux_logits, targets)
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(aux_logits, targets)
    return F.kl_div(aux_logits.log_softmax(dim=-1), targets, reduction="none").sum(dim=-1).mean()


@contextlib.contextmanager
def unpruned(model: CroprViTPreTrainedModel) -> Iterator[CroprViTPreTrainedModel]:
    """`model` with pruning off (its Cropr modules kept) inside the block, at its own schedule again after it."""
    if not model.config.pruning_blocks:
        yield model
        return
    with _own_schedule_after(model):
        yield model.set_pruning_rate(0)


@contextlib.contextmanager
def pruning_at(model: CroprViTPreTrainedModel, schedule: list[int]) -> Iterator[CroprViTPreTrainedModel]:
    """`model` at another schedule of its modules inside the block, at its own schedule again after it."""
    with _own_schedule_after(model):
        yield model.set_pruning_schedule(schedule)


@contextlib.contextmanager
def _own_schedule_after(model: CroprViTPreTrainedModel) -> Iterator[None]:
    rate, schedule = model.config.pruning_rate, model.config.pruning_schedule
    try:
        yield
    finally:
        if schedule is None:
            model.set_pruning_rate(rate)
        else:
            model.set_pruning_schedule(schedule)


def _label_tensor(model: CroprViTPreTrainedModel, labels: list, image_processor, images) -> torch.Tensor:
    if isinstance(model, CroprViTForSemanticSegmentation):
        maps = [np.asarray(label) for label in labels]
        return image_processor(images, segmentation_maps=maps, return_tensors="pt")["labels"].long()
    return torch.tensor(labels)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def calibrate(
    source: str | os.PathLike | PreTrainedModel,
    images: str | os.PathLike | Any,
    output_dir: str | os.PathLike | None = None,
    *,
    task: str | None = None,
    image_processor: ImageProcessingMixin | str | None = None,
    label_column: str | None = None,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    save_steps: int = 50,
    resume: bool = True,
    progress: bool = True,
    contrast_weights: Sequence[float] = CONTRAST_WEIGHTS,
    selection_images: int = SELECTION_IMAGES,
    **overrides: Any,
) -> CalibrationResult:
    """Train the Cropr modules (queries, aggregators, auxiliary heads) of a frozen model on `images`, then choose
    each module's scorer.

    Two scorers per module come out of the same unpruned forward passes: the query learned through the auxiliary
    heads, and a linear read-out of patch contrast ([`ContrastReadout`]). Each mix in `contrast_weights` prunes
    `selection_images` of the images at fractions of the schedule ([`SELECTION_FRACTIONS`]), and the mix whose
    predictions change least from the unpruned model's ([`prediction_change`]: mostly, the share of changed
    decisions) is kept (the smaller share on a tie).

    Args:
        source: a CroprViT model or checkpoint (folder or Hub id), or a backbone or image classifier (folder, Hub id
            or model object) that `from_backbone` converts (see [`load_for_calibration`]).
        images: a folder of image files, a `datasets.Dataset`, or a dataset name / folder (its train split).
        output_dir: where the stripped checkpoint, its image processor and `calibration.json` are saved (and the
            state to resume from while it runs); `None` saves nothing.
        task: for a source to convert, "image-classification" (an image classifier, its own head kept; the default
            when the source is one) or "feature-extraction" (the default for a backbone); checked against a CroprViT
            source's head.
        image_processor: the image processor to use: needed for a CroprViT model object; a source to convert gets
            the one `from_backbone` builds unless given.
        label_column: learn from this column's labels (class ids, multi-hot rows or segmentation maps) instead of
            the model's own predictions.
        epochs, max_steps: passes over the images (fractions allowed), or a number of steps that overrides them.
        batch_size, learning_rate, seed: AdamW steps of `batch_size` images; the order of the images in each epoch
            follows `seed` and the epoch.
        save_steps: steps between saves of the state to resume from.
        resume: continue from the state in `output_dir` when one is there (written by an interrupted run with the
            same settings); `False` starts over.
        progress: show a progress bar with the time left.
        contrast_weights: shares of the contrast read-out to compare, each in [0, 1]; `(0.0,)` keeps the learned
            queries as they are, with no comparison.
        selection_images: how many of the images (in the first epoch's order) the comparison runs on.
        **overrides: `pruning_rate` / `pruning_schedule` of the calibrated model, and for a backbone any other
            `from_backbone` option (`image_size`, ...).

    Returns:
        A [`CalibrationResult`]; its model is stripped, in eval mode, backbone and head as they were.

    Raises:
        ValueError: for invalid settings or a source it cannot calibrate (before any step), and after the run when
            no patch had a target to learn (a segmenter that predicted only `aux_ignored_labels` classes on the
            images); nothing is saved then.
    """
    if batch_size < 1 or save_steps < 1:
        raise ValueError(f"`batch_size` and `save_steps` must be >= 1, got {batch_size} and {save_steps}")
    if max_steps is None and not epochs > 0:
        raise ValueError(f"`epochs` must be > 0, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
    contrast_weights = tuple(float(weight) for weight in contrast_weights)
    if not contrast_weights or not all(0.0 <= weight <= 1.0 for weight in contrast_weights):
        raise ValueError(f"`contrast_weights` must be shares in [0, 1], at least one, got {contrast_weights}")
    if selection_images < 1:
        raise ValueError(f"`selection_images` must be >= 1, got {selection_images}")
    data = CalibrationImages(images, label_column)
    source_model, image_processor, overrides = load_for_calibration(source, task, image_processor, **overrides)
    model = with_training_modules(source_model, overrides)
    if not model.config.blocks_with_routers:
        raise ValueError(
            f"the schedule {model.config.effective_pruning_schedule} prunes after no block, so there is no Cropr "
            "module to calibrate: calibrate at the heaviest rate you will run; `set_pruning_rate` turns it down later"
        )
    source_num_labels = source_model.config.num_labels
    del source_model
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total_steps = max_steps if max_steps is not None else max(1, round(epochs * steps_per_epoch))

    model.eval().requires_grad_(False)
    routers = model.base_model.token_selector.routers
    trainable = [parameter for router in routers.values() for parameter in router.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    config = model.config
    readout = ContrastReadout(routers, config.hidden_size, config.num_prefix_tokens, config.patch_size_hw)
    # Everything that shapes the run: resuming another one (other rate, learning rate, labels, source) is refused.
    settings = {
        "source": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
        "pruning_schedule": model.config.effective_pruning_schedule,
        "label_column": label_column,
        "num_images": len(data),
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "total_steps": total_steps,
        "seed": seed,
        "contrast_weights": list(contrast_weights),
    }
    state_path = Path(output_dir) / STATE_FILE if output_dir is not None else None
    start, losses = 0, []
    if resume and state_path is not None and state_path.is_file():
        start, losses = _load_state(state_path, settings, routers, optimizer, readout)

    started = time.perf_counter()
    bar = _progress_bar(total_steps, start, progress)
    with unpruned(model):  # once for the run, rather than at every step's `calibration_targets`
        for step in range(start, total_steps):
            losses.append(
                _step(model, data, image_processor, optimizer, step, steps_per_epoch, batch_size, seed, readout)
            )
            bar.update(1)
            bar.set_postfix(aux_loss=f"{losses[-1]:.4f}")
            if state_path is not None and (step + 1) % save_steps == 0 and step + 1 < total_steps:
                _save_state(state_path, settings, routers, optimizer, step + 1, losses, readout)
    bar.close()
    if all(loss == 0.0 for loss in losses):
        # Only a segmenter's loss is exactly 0, when every patch is masked out; saving would replace the source's
        # routers with untrained ones.
        raise ValueError(
            f"No patch of the {len(data)} images had a target the Cropr modules learn (each was predicted as a class "
            f"of `aux_ignored_labels` {model.config.aux_ignored_labels}, or labelled with the ignore index), so "
            "nothing was calibrated and nothing is saved: calibrate on images in which the model finds objects."
        )

    model.eval().strip_training_modules()
    if isinstance(model, CroprViTModel):  # the auxiliary heads that needed one output per feature are gone
        model.config.num_labels = source_num_labels
        model._record_config()
    contrast_weight, prediction_changes = choose_scorers(
        model, data, image_processor, readout, contrast_weights, selection_images, batch_size, seed, progress
    )
    model.requires_grad_(True)
    seconds = time.perf_counter() - started
    tenth = max(1, len(losses) // 10)
    result = CalibrationResult(
        model=model,
        image_processor=image_processor,
        steps=total_steps,
        num_images=len(data),
        seconds=seconds,
        first_loss=float(np.mean(losses[:tenth])),
        last_loss=float(np.mean(losses[-tenth:])),
        output_dir=None if output_dir is None else str(output_dir),
        contrast_weight=contrast_weight,
        prediction_changes=prediction_changes,
        losses=losses,
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        image_processor.save_pretrained(output_dir)
        summary = {key: getattr(result, key) for key in ("steps", "num_images", "seconds", "first_loss", "last_loss")}
        changes = {str(weight): value for weight, value in prediction_changes.items()}
        summary.update(contrast_weight=contrast_weight, prediction_changes=changes)
        summary.update(batch_size=batch_size, learning_rate=learning_rate, seed=seed, label_column=label_column)
        (Path(output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if state_path.is_file():
            state_path.unlink()
    return result


def _save_state(
    path: Path,
    settings: dict,
    routers: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    losses: list,
    readout: ContrastReadout,
) -> None:
    """The Cropr modules, the optimizer and the read-out's sums after `step` steps, in a safetensors file, written
    atomically."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"routers.{key}": value.contiguous() for key, value in routers.state_dict().items()}
    tensors.update({f"readout.{key}": value.contiguous() for key, value in readout.state_tensors().items()})
    for index, values in optimizer_state["state"].items():
        tensors.update({f"optimizer.{index}.{name}": value.contiguous() for name, value in values.items()})
    metadata = {"settings": settings, "step": step, "losses": losses, "param_groups": optimizer_state["param_groups"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, partial, metadata={"calibration": json.dumps(metadata)})
    partial.replace(path)


def _load_state(
    path: Path, settings: dict, routers: torch.nn.Module, optimizer: torch.optim.Optimizer, readout: ContrastReadout
) -> tuple[int, list[float]]:
    """Restore what [`_save_state`] wrote; returns the step to continue from and the losses so far."""
    with safe_open(path, framework="pt") as state:
        metadata = json.loads(state.metadata()["calibration"])
        tensors = {key: state.get_tensor(key) for key in state.keys()}
    if metadata["settings"] != settings:
        raise ValueError(
            f"{path} holds an interrupted calibration with other settings ({metadata['settings']}, now {settings}): "
            "pass resume=False (--no-resume) to start over"
        )
    routers.load_state_dict({key[len("routers.") :]: value for key, value in tensors.items() if key[:8] == "routers."})
    readout.load_state_tensors(
        {key[len("readout.") :]: value for key, value in tensors.items() if key[:8] == "readout."}
    )
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": metadata["param_groups"]})
    return metadata["step"], metadata["losses"]


def _step(
    model: CroprViTPreTrainedModel,
    data: CalibrationImages,
    image_processor: ImageProcessingMixin,
    optimizer: torch.optim.Optimizer,
    step: int,
    steps_per_epoch: int,
    batch_size: int,
    seed: int,
    readout: ContrastReadout,
) -> float:
    """One optimizer step of the Cropr modules on the step's batch (its images follow the seed and the epoch), whose
    unpruned tokens also go into the contrast read-out's sums."""
    indices = _epoch_order(len(data), seed, step // steps_per_epoch)
    position = step % steps_per_epoch
    batch_images, batch_labels = data.batch(indices[position * batch_size : (position + 1) * batch_size])
    pixel_values = _pixel_values(image_processor, batch_images, model)
    labels = None
    if batch_labels is not None:
        labels = _label_tensor(model, batch_labels, image_processor, batch_images).to(model.device)
    hidden_states, targets, mask = calibration_targets(model, pixel_values, labels)
    readout.accumulate(hidden_states, pixel_values)
    loss = torch.zeros((), device=model.device)
    for block, router in model.base_model.token_selector.routers.items():
        router.train()
        _, aux_logits = router(hidden_states[int(block) + 1])
        loss = loss + auxiliary_loss(model, aux_logits, targets, mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _epoch_order(num_images: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(num_images).tolist()


def _pixel_values(image_processor: ImageProcessingMixin, images: list, model: CroprViTPreTrainedModel) -> torch.Tensor:
    return image_processor(images, return_tensors="pt")["pixel_values"].to(model.device)


@torch.no_grad()
def choose_scorers(
    model: CroprViTPreTrainedModel,
    data: CalibrationImages,
    image_processor: ImageProcessingMixin,
    readout: ContrastReadout,
    contrast_weights: Sequence[float],
    num_images: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> tuple[float, dict[float, float]]:
    """Give every Cropr module of the stripped `model` the mix of its learned query and its contrast read-out, at
    the one share for all modules whose pruning changes the unpruned predictions least; returns that share and each
    compared share's [`prediction_change`], averaged over the images and the [`SELECTION_FRACTIONS`] of the
    schedule."""
    routers = model.base_model.token_selector.routers
    learned = {block: router.aggregated_query.clone() for block, router in routers.items()}
    contrast = readout.queries()
    spreads = {
        block: (readout.score_spread(block, learned[block]), readout.score_spread(block, contrast[block]))
        for block in routers
    }
    candidates = {
        weight: {block: mixed_query(learned[block], contrast[block], weight, spreads[block]) for block in routers}
        for weight in contrast_weights
    }
    if len(candidates) == 1:
        ((weight, queries),) = candidates.items()
        _set_queries(routers, queries)
        return weight, {}
    own_schedule = model.config.effective_pruning_schedule
    schedules = []
    for fraction in SELECTION_FRACTIONS:
        schedule = [round(count * fraction) for count in own_schedule]
        if any(schedule) and schedule not in schedules:
            schedules.append(schedule)
    indices = _epoch_order(len(data), seed, 0)[:num_images]
    totals = dict.fromkeys(candidates, 0.0)
    batches = range(0, len(indices), batch_size)
    bar = _progress_bar(len(batches), 0, progress, "choosing scorers", "batch")
    for start in batches:
        images, _ = data.batch(indices[start : start + batch_size])
        pixel_values = _pixel_values(image_processor, images, model)
        with unpruned(model):
            targets = model_predictions(model, model(pixel_values))
        for schedule in schedules:
            with pruning_at(model, schedule):
                for weight, queries in candidates.items():
                    _set_queries(routers, queries)
                    totals[weight] += float(prediction_change(model, model(pixel_values), targets).sum())
        bar.update(1)
    bar.close()
    changes = {weight: total / (len(indices) * len(schedules)) for weight, total in totals.items()}
    chosen = min(changes, key=lambda weight: (changes[weight], weight))
    _set_queries(routers, candidates[chosen])
    return chosen, changes


def _set_queries(routers: torch.nn.ModuleDict, queries: dict[str, torch.Tensor]) -> None:
    for block, router in routers.items():
        router.aggregated_query.copy_(queries[block])


def _progress_bar(total: int, start: int, enabled: bool, description: str = "calibrating", unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=description, unit=unit, disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cropr calibrate",
        description="Train only the Cropr modules of a frozen model on its own unpruned predictions (no labels "
        "needed), keep the mix of their learned queries and a read-out of patch contrast whose pruning changes the "
        "fewest of the unpruned predictions, and save the stripped checkpoint. Resumes an interrupted run in "
        "--output-dir.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "source", help="CroprViT checkpoint (folder or Hub id), or a backbone / image classifier to convert"
    )
    parser.add_argument(
        "--images", required=True, help="folder of images, or a dataset (Hub id or folder; its train split)"
    )
    parser.add_argument(
        "--output-dir",
        type=output_dir,
        required=True,
        help="folder for the calibrated checkpoint, its image processor and calibration.json",
    )
    parser.add_argument(
        "--task",
        choices=["feature-extraction", "image-classification", "multi-label-classification", "semantic-segmentation"],
        help="checked against a CroprViT source; a source to convert is calibrated as an image classifier with "
        "its own head when it is one, else as a feature-extraction model",
    )
    parser.add_argument("--label-column", help="learn from this column's labels instead of the model's predictions")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the images (fractions allowed)")
    parser.add_argument("--max-steps", type=bounded_int(1), help="number of steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=bounded_int(1), default=32, help="images per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate of the Cropr modules")
    parser.add_argument("--seed", type=int, default=0, help="order of the images in each epoch, fresh modules")
    parser.add_argument("--save-steps", type=bounded_int(1), default=50, help="steps between saves of the state")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start over, ignoring saved state")
    parser.add_argument(
        "--pruning-rate", type=bounded_int(0), help="tokens removed after every block (default: the source's)"
    )
    parser.add_argument(
        "--pruning-schedule",
        type=parse_schedule,
        help="tokens removed after each block: 0,16,... (overrides --pruning-rate)",
    )
    parser.add_argument("--image-size", type=parse_image_size, help="backbone sources: the converted model's size")
    parser.add_argument(
        "--contrast-weights",
        type=parse_shares,
        default=",".join(f"{weight:g}" for weight in CONTRAST_WEIGHTS),
        help="shares of the contrast read-out in the scorers compared after training (0 alone keeps the learned "
        "queries)",
    )
    parser.add_argument(
        "--selection-images", type=bounded_int(1), default=SELECTION_IMAGES, help="images the scorers are compared on"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


@contextlib.contextmanager
def without_transformers_progress_bars() -> Iterator[None]:
    """transformers' own bars (loading and saving weights) off, as they were afterwards."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """`cropr calibrate`: prints where the calibrated checkpoint went and the auxiliary loss before and after."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = {
        name: getattr(args, name)
        for name in ("pruning_rate", "pruning_schedule", "image_size")
        if getattr(args, name) is not None
    }
    with without_transformers_progress_bars() if args.quiet else contextlib.nullcontext():
        result = calibrate(
            args.source,
            args.images,
            args.output_dir,
            task=args.task,
            label_column=args.label_column,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            save_steps=args.save_steps,
            resume=args.resume,
            progress=not args.quiet,
            contrast_weights=args.contrast_weights,
            selection_images=args.selection_images,
            **overrides,
        )
    rates = result.model.config.pruning_rate_range()
    dial = f"; it runs pruning rates {rates[0]}..{rates[1]} (pruning_rate=R)" if rates is not None else ""
    print(
        f"Calibrated {result.steps} steps on {result.num_images} images in {result.seconds:.0f} s: auxiliary loss "
        f"{result.first_loss:.4f} -> {result.last_loss:.4f}; scorers kept: {result.contrast_weight:g} of the "
        f"contrast read-out. Stripped {type(result.model).__name__} checkpoint and "
        f"image processor saved to {result.output_dir}{dial}"
    )
    return 0


__all__ = [
    "CalibrationImages",
    "CalibrationResult",
    "auxiliary_loss",
    "calibrate",
    "calibration_targets",
    "choose_scorers",
    "load_for_calibration",
    "prediction_change",
    "problem_type",
    "pruning_at",
    "unpruned",
    "with_training_modules",
]
