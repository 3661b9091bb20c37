"""The data pipeline of training and evaluation: 8-bit RGB images through the image processor, labels as the task
needs them, and horizontal flips that are a pure function of (seed, epoch, example index), so a resumed run sees the
same flips as one that never stopped."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import SegformerImageProcessorPil, TrainerCallback, ViTImageProcessorPil

from ..data.formats import LabelFormat
from ..data.images import to_rgb
from .tasks import TaskSpec, builtin_label_format


def flip_image(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def flip_example(seed: int, epoch: int, index: int) -> bool:
    """Whether the training augmentation flips example `index` in `epoch`: a fair coin that is a pure function of its
    arguments (no generator state), so a run resumed from a checkpoint flips every example as one that never stopped.
    """
    return random.Random(f"{seed}:{epoch}:{index}").random() < 0.5


def make_transforms(
    task: TaskSpec,
    processor: ViTImageProcessorPil | SegformerImageProcessorPil,
    augment: bool,
    seed: int,
    label_format: LabelFormat | None = None,
) -> Callable[..., dict[str, Any]]:
    """The image processor, plus with `augment` random horizontal flips decided by [`flip_example`].

    Images become 8-bit RGB (`to_rgb`: 16-bit images are scaled, not clipped); labels become targets as
    `label_format` says (default: the built-in data's layout). Segmentation masks keep their class ids as given:
    `label_format` alone applies `reduce_labels`, whatever the image processor's `do_reduce_labels`.
    Without `augment`, a `Dataset.with_transform` function. With it, the transform needs each example's index and
    the epoch (`transform(batch, indices=..., epoch=...)`): wrap the split in a [`TrainingSplit`].
    """
    label_format = label_format or builtin_label_format(task)

    def transform(batch: dict[str, list], indices: Sequence[int] | None = None, epoch: int = 0) -> dict[str, Any]:
        images = [to_rgb(image) for image in batch["image"]]
        if not augment:
            flips = [False] * len(images)
        elif indices is None:
            raise ValueError("random flips depend on each example's index: wrap the split in a TrainingSplit")
        else:
            flips = [flip_example(seed, epoch, index) for index in indices]
        images = [flip_image(image) if flip else image for image, flip in zip(images, flips, strict=True)]
        if task.name == "semantic-segmentation":
            masks = [
                label_format.mask(mask, (image.height, image.width))
                for mask, image in zip(batch[task.label_column], images, strict=True)
            ]
            masks = [np.fliplr(mask).copy() if flip else mask for mask, flip in zip(masks, flips, strict=True)]
            encoded = processor(images=images, segmentation_maps=masks, do_reduce_labels=False, return_tensors="pt")
            return {"pixel_values": encoded["pixel_values"], "labels": encoded["labels"].long()}
        encoded = processor(images=images, return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "labels": label_format.targets(batch[task.label_column])}

    return transform


class TrainingSplit(torch.utils.data.Dataset):
    """A training split with its augmenting transform (from [`make_transforms`]), which gets each example's index and
    the epoch: the same example in the same epoch is augmented the same way, also after resuming from a checkpoint.

    Give `Trainer` an [`EpochCallback`] of it as well: it sets the epoch (accelerate's dataloaders forward their
    `set_epoch` to the dataset in single-process runs only).
    """

    def __init__(self, split, transform: Callable[..., dict[str, Any]]) -> None:
        self.split, self.transform = split, transform
        # In shared memory, so that persistent dataloader workers see each new epoch too.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        batch = self.transform(self.split[indices], indices=indices, epoch=int(self._epoch))
        return [{name: values[position] for name, values in batch.items()} for position in range(len(indices))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


class EpochCallback(TrainerCallback):
    """Tells a [`TrainingSplit`] which epoch starts."""

    def __init__(self, dataset: TrainingSplit) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is the epoch plus its completed share: whole at an epoch's start, fractional when a run
        # resumes mid-epoch (whose number Trainer computes the same way, from the steps done).
        self.dataset.set_epoch(math.floor(state.epoch or 0))
