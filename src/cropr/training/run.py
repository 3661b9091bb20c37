"""Fine-tune a CroprViT with `Trainer`: the code behind `scripts/train_*.py`, shared by the three tasks.

In the manner of transformers' example scripts: `HfArgumentParser` over dataclasses, `Trainer`, `TrainingArguments`.
Data comes from a Hub dataset / `imagefolder` or from the built-in Fashion-MNIST tasks; the model from a CroprViT
checkpoint, a ViT/DINOv2 backbone converted on the fly, or a preset trained from scratch. At the end the script
evaluates, saves the stripped inference checkpoint with its image processor, and prints the eval metric and
throughput of the pruned model next to the same weights with pruning off.

The scripts call [`main`], which reports a [`RunError`] (bad arguments, a diverged run) as one line on stderr and exits
with status 1; [`run`] raises it, for use from Python.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict, load_dataset
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    HfArgumentParser,
    SegformerImageProcessorPil,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTImageProcessorPil,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from ..data import id2label as builtin_id2label
from ..data import load_builtin_task
from ..data.formats import LabelFormat, find_id2label_file, prepare_dataset, read_class_names, read_id2label
from ..data.images import to_rgb
from ..models.cropr_vit.configuration_cropr_vit import (
    LEARNED_SELECTORS,
    TOKEN_SELECTORS,
    CroprViTConfig,
    per_block_schedule,
)
from ..models.cropr_vit.modeling_cropr_vit import (
    CroprViTForImageClassification,
    CroprViTForMultiLabelClassification,
    CroprViTForSemanticSegmentation,
    CroprViTPreTrainedModel,
)
from ..presets import PRESETS, preset_config
from ..tools.timing import measure_throughput
from . import metrics
from .curriculum import PruningCurriculumCallback

logger = logging.getLogger(__name__)

LATEST_CHECKPOINT = "latest"
"""`--resume_from_checkpoint` value that picks the newest complete checkpoint in `--output_dir`."""


class RunError(ValueError):
    """A problem with a run's arguments or outcome that the scripts report as one line, without a traceback."""


@dataclass(frozen=True)
class TaskSpec:
    """What differs between the three tasks."""

    name: str  # the `from_backbone` task name
    builtin_task: str
    model_class: type[CroprViTPreTrainedModel]
    label_column: str
    main_metric: str
    default_curriculum: float


TASKS: dict[str, TaskSpec] = {
    "image-classification": TaskSpec(
        "image-classification", "cluttered-classification", CroprViTForImageClassification, "label", "accuracy", 0.0
    ),
    "multi-label-classification": TaskSpec(
        "multi-label-classification", "multi-label", CroprViTForMultiLabelClassification, "labels", "mAP", 0.0
    ),
    # The paper ramps R over the first half of segmentation training.
    "semantic-segmentation": TaskSpec(
        "semantic-segmentation", "segmentation", CroprViTForSemanticSegmentation, "label", "mean_iou", 0.5
    ),
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A CroprViT checkpoint (Hub id or directory) to fine-tune."}
    )
    backbone: str | None = field(
        default=None,
        metadata={"help": "A ViT / DINOv2 checkpoint (Hub id or directory) converted to CroprViT on the fly."},
    )
    preset: str = field(
        default="vit-mini8-112",
        metadata={"help": f"Shape to train from scratch when neither of the above is given: {sorted(PRESETS)}."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Model input size; defaults to the canvas size of the built-in data."}
    )
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth of the last block."})
    trust_remote_code: bool = field(default=False)
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "With --model_name_or_path: re-initialise the heads whose size differs (another number of labels)."
        },
    )


@dataclass
class PruningArguments:
    # The three settings below default to None = "the checkpoint's own value" (--model_name_or_path), or the
    # CroprViTConfig default for a new model (cropr, Last Layer Fusion on, weight 1), so that fine-tuning a saved
    # model never silently swaps its selector or fusion mode.
    token_selector: str | None = field(
        default=None, metadata={"help": f"One of {TOKEN_SELECTORS} (default: the checkpoint's, or cropr)."}
    )
    pruning_rate: int | None = field(default=None, metadata={"help": "Tokens removed after each block (R)."})
    pruning_schedule: str | None = field(
        default=None, metadata={"help": "Tokens removed after each block, comma-separated (overrides the rate)."}
    )
    last_layer_fusion: bool | None = field(
        default=None, metadata={"help": "Restore all tokens before the last block (default: the checkpoint's, or on)."}
    )
    aux_loss_weight: float | None = field(
        default=None, metadata={"help": "Weight of the Cropr auxiliary losses (default: the checkpoint's, or 1)."}
    )
    aux_ignored_labels: str | None = field(
        default=None,
        metadata={
            "help": "Segmentation: comma-separated class names or ids that the Cropr modules' auxiliary loss ignores "
            "(a dominant background class; 'none' for no class). Default: the checkpoint's; for a new model, the "
            "class named 'background' if there is one."
        },
    )
    curriculum_ramp: float | None = field(
        default=None,
        metadata={"help": "Share of training over which R rises from 0 (0 = off; default 0.5 for segmentation)."},
    )
    curriculum_per_epoch: bool = field(default=False, metadata={"help": "Step the curriculum once per epoch."})

    def config_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {
            name: value
            for name in ("token_selector", "last_layer_fusion", "aux_loss_weight", "pruning_rate")
            if (value := getattr(self, name)) is not None
        }
        if self.pruning_schedule:
            try:
                overrides["pruning_schedule"] = [int(count) for count in self.pruning_schedule.split(",")]
            except ValueError:
                raise ValueError(
                    f"--pruning_schedule must be comma-separated integers, got {self.pruning_schedule!r}"
                ) from None
        return overrides


@dataclass
class DataArguments:
    builtin_task: str | None = field(
        default=None,
        metadata={"help": "Built-in Fashion-MNIST task (the default when no --dataset_name / --train_dir is given)."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset, or 'imagefolder'."})
    dataset_config_name: str | None = field(default=None)
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder training directory."})
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder validation directory."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column of the images; default: the first of image, img, pixel_values."}
    )
    label_column_name: str | None = field(
        default=None,
        metadata={
            "help": "Column of the labels; default: label (classification), labels or label (multi-label), label "
            "or annotation (segmentation masks)."
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "Class names, comma-separated or a text file with one per line, for labels stored as ids or "
            "multi-hot lists without names (and segmentation masks)."
        },
    )
    id2label: str | None = field(
        default=None,
        metadata={
            "help": 'Class names as a JSON file {"0": "name", ...} (transformers\' id2label); default: the '
            "dataset's id2label.json (in its folder, beside --train_dir, or in its Hub repository), else the label "
            "feature's names."
        },
    )
    do_reduce_labels: bool = field(
        default=False,
        metadata={
            "help": "Segmentation: the masks mark unlabelled pixels with 0 and class k with k + 1 (as ADE20k / "
            "scene_parse_150): 0 becomes 255 (ignored) and k + 1 becomes k. Off: mask values are the class ids, "
            "0 included."
        },
    )
    num_train_samples: int = field(default=4000, metadata={"help": "Built-in data: training scenes."})
    num_eval_samples: int = field(default=500, metadata={"help": "Built-in data: validation scenes."})
    canvas_size: int = field(default=112, metadata={"help": "Built-in data: canvas side in pixels."})
    fashion_mnist_dir: str | None = field(default=None, metadata={"help": "Where the Fashion-MNIST IDX files are."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    throughput_batch_size: int = field(default=32, metadata={"help": "Batch size of the final throughput check."})


@dataclass
class CroprTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the output-folder options of the scripts (transformers 5 dropped its own flag)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch although --output_dir holds checkpoints of an earlier run (they are deleted). "
            "Without it, such a folder is refused unless --resume_from_checkpoint is given."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": f"A checkpoint folder to continue training from, or '{LATEST_CHECKPOINT}' for the newest complete "
            "checkpoint in --output_dir."
        },
    )


def check_argument_conflicts(
    task: TaskSpec,
    model_args: ModelArguments,
    pruning_args: PruningArguments,
    do_train: bool,
    resume_from_checkpoint: str | None,
    overwrite_output_dir: bool = False,
) -> None:
    """Refuse arguments that the run would silently ignore, and evaluation of Cropr modules that never trained.

    Runs right after parsing, before any data or weights are loaded (it reads the config of --model_name_or_path).
    """
    if model_args.model_name_or_path and model_args.backbone:
        raise RunError("give either --model_name_or_path (a CroprViT checkpoint) or --backbone, not both")
    if model_args.model_name_or_path:
        check_cropr_checkpoint(model_args.model_name_or_path, model_args.trust_remote_code)
    if pruning_args.token_selector == "none":
        given = [
            flag
            for flag, value in (
                ("--pruning_rate", pruning_args.pruning_rate),
                ("--pruning_schedule", pruning_args.pruning_schedule),
                ("--curriculum_ramp", pruning_args.curriculum_ramp or None),
            )
            if value is not None
        ]
        if given:
            raise RunError(f"--token_selector none prunes nothing, so {' and '.join(given)} would be ignored")
    if pruning_args.pruning_rate is not None and pruning_args.pruning_schedule:
        raise RunError("--pruning_schedule replaces --pruning_rate: give one of them")
    # The selector the model will have, where known before loading (a checkpoint's own is read only later).
    selector = pruning_args.token_selector or (None if model_args.model_name_or_path else CroprViTConfig.token_selector)
    if pruning_args.aux_loss_weight is not None and selector is not None and selector not in LEARNED_SELECTORS:
        raise RunError(
            f"--aux_loss_weight weighs the Cropr modules' losses, but --token_selector {selector} has no Cropr "
            "modules: it would be ignored"
        )
    if pruning_args.aux_ignored_labels is not None:
        if task.name != "semantic-segmentation":
            raise RunError(
                "--aux_ignored_labels applies to the per-patch auxiliary loss of semantic segmentation, "
                f"not {task.name}"
            )
        if selector is not None and selector not in LEARNED_SELECTORS:
            raise RunError(
                f"--aux_ignored_labels shapes the Cropr modules' auxiliary loss, but --token_selector {selector} has "
                "no Cropr modules: it would be ignored"
            )
    ramp = task.default_curriculum if pruning_args.curriculum_ramp is None else pruning_args.curriculum_ramp
    if pruning_args.curriculum_per_epoch and ramp == 0:
        raise RunError("--curriculum_per_epoch steps a curriculum, but --curriculum_ramp is 0 (no curriculum)")
    if not do_train and resume_from_checkpoint:
        raise RunError("--resume_from_checkpoint continues training, but this run does not train (--do_train)")
    if overwrite_output_dir and resume_from_checkpoint:
        raise RunError("--overwrite_output_dir starts over, --resume_from_checkpoint continues: give one of them")
    if not do_train and not model_args.model_name_or_path:
        if selector in LEARNED_SELECTORS:
            raise RunError(
                f"--token_selector {selector} without training and without a trained checkpoint "
                "would evaluate untrained Cropr modules: train (--do_train), pass a fine-tuned CroprViT with "
                "--model_name_or_path, or pick a training-free selector (random, variance, attention, none)"
            )
        logger.warning(
            "Evaluating without training: the %s head is freshly initialised (chance-level metrics)", task.name
        )


def load_task_data(
    task: TaskSpec, data_args: DataArguments, seed: int
) -> tuple[DatasetDict, dict[int, str], LabelFormat]:
    """The train/validation splits (columns `image` and `task.label_column`), the label names and the label format.

    Custom data (`--dataset_name` / `--train_dir`) keeps only its image and label columns, renamed; its label layout
    is found by `cropr.data.formats.detect_label_format`.
    """
    if data_args.do_reduce_labels and task.name != "semantic-segmentation":
        raise ValueError(f"--do_reduce_labels applies to segmentation masks, not {task.name}")
    if data_args.dataset_name or data_args.train_dir:
        if data_args.builtin_task:
            raise ValueError("give either --builtin_task or --dataset_name/--train_dir, not both")
        if data_args.class_names and data_args.id2label:
            raise ValueError("give the class names once: --class_names or --id2label, not both")
        id2label = None
        if data_args.class_names:
            id2label = read_class_names(data_args.class_names)
        elif data_args.id2label:
            id2label = read_id2label(data_args.id2label)
        data_files = {}
        if data_args.train_dir:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset(
            data_args.dataset_name or "imagefolder", data_args.dataset_config_name, data_files=data_files or None
        )
        if "train" not in dataset:
            raise ValueError(f"the dataset has no train split (splits: {list(dataset)})")
        if "validation" not in dataset:
            split = dataset["train"].train_test_split(test_size=0.1, seed=seed)
            dataset = DatasetDict(train=split["train"], validation=split["test"])
        dataset = DatasetDict(train=dataset["train"], validation=dataset["validation"])
        if id2label is None:
            if (names_file := find_id2label_file(data_args.dataset_name, data_args.train_dir)) is not None:
                logger.info("class names from %s", names_file)
                id2label = read_id2label(names_file)
        dataset, label_format = prepare_dataset(
            dataset,
            task.name,
            image_column=data_args.image_column_name,
            label_column=data_args.label_column_name,
            id2label=id2label,
            reduce_labels=data_args.do_reduce_labels,
            target_columns=("image", task.label_column),
        )
    else:
        custom_only = [
            flag
            for flag, value in (
                ("--image_column_name", data_args.image_column_name),
                ("--label_column_name", data_args.label_column_name),
                ("--class_names", data_args.class_names),
                ("--id2label", data_args.id2label),
                ("--do_reduce_labels", data_args.do_reduce_labels),
            )
            if value
        ]
        if custom_only:
            raise ValueError(
                f"{', '.join(custom_only)} describe your own data (--dataset_name / --train_dir), not the built-in task"
            )
        builtin = data_args.builtin_task or task.builtin_task
        if builtin != task.builtin_task:
            raise ValueError(
                f"this script trains {task.name}; its built-in task is {task.builtin_task!r}, not {builtin!r}"
            )
        dataset = load_builtin_task(
            builtin,
            num_train=data_args.num_train_samples,
            num_eval=data_args.num_eval_samples,
            image_size=data_args.canvas_size,
            seed=seed,
            source=data_args.fashion_mnist_dir,
        )
        label_format = builtin_label_format(task)
    if data_args.max_train_samples is not None:
        dataset["train"] = dataset["train"].select(range(min(data_args.max_train_samples, len(dataset["train"]))))
    if data_args.max_eval_samples is not None:
        dataset["validation"] = dataset["validation"].select(
            range(min(data_args.max_eval_samples, len(dataset["validation"])))
        )
    return dataset, label_format.id2label, label_format


def builtin_label_format(task: TaskSpec) -> LabelFormat:
    """The label layout of the task's built-in data (`cropr.data.load_builtin_task`)."""
    layout = {"cluttered-classification": "class_ids", "multi-label": "multi_hot", "segmentation": "masks"}
    return LabelFormat(layout[task.builtin_task], builtin_id2label(task.builtin_task))


def build_model(
    task: TaskSpec, model_args: ModelArguments, pruning_args: PruningArguments, labels: dict[int, str], image_size: int
) -> tuple[CroprViTPreTrainedModel, ViTImageProcessorPil | SegformerImageProcessorPil]:
    """A CroprViT for the task from a checkpoint, a converted backbone or a preset; and its image processor."""
    overrides = pruning_args.config_overrides()
    if model_args.drop_path_rate is not None:
        overrides["drop_path_rate"] = model_args.drop_path_rate
    label_kwargs = {"id2label": labels, "label2id": {name: index for index, name in labels.items()}}
    if task.name == "semantic-segmentation":
        ignored = resolve_aux_ignored_labels(pruning_args.aux_ignored_labels, labels)
        if ignored is None and not model_args.model_name_or_path:
            ignored = [index for index, name in labels.items() if name.lower() == "background"]
        if ignored is not None:
            overrides["aux_ignored_labels"] = ignored
    if model_args.backbone:
        from ..conversion import from_backbone

        if "pruning_rate" not in overrides and "pruning_schedule" not in overrides:
            overrides["pruning_schedule"] = backbone_schedule(model_args.backbone, image_size, overrides)
        return from_backbone(model_args.backbone, task.name, image_size=image_size, id2label=labels, **overrides)
    if model_args.model_name_or_path:
        auto_class = (
            AutoModelForSemanticSegmentation
            if task.name == "semantic-segmentation"
            else AutoModelForImageClassification
        )
        model = auto_class.from_pretrained(
            model_args.model_name_or_path,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            num_labels=len(labels),
            **label_kwargs,
            **overrides,
        )
        if model_args.image_size is not None and model.config.image_size_hw != (model_args.image_size,) * 2:
            height, width = model.config.image_size_hw
            raise RunError(
                f"--image_size {model_args.image_size} does not match the input size of "
                f"{model_args.model_name_or_path} ({height}x{width}): a checkpoint keeps its own size (config and "
                "image processor); drop --image_size"
            )
        if task.name == "multi-label-classification":
            model.config.problem_type = "multi_label_classification"
        processor_class = SegformerImageProcessorPil if task.name == "semantic-segmentation" else ViTImageProcessorPil
        processor = processor_class.from_pretrained(model_args.model_name_or_path)
        return model, processor
    segmentation = task.name == "semantic-segmentation"
    config = preset_config(
        model_args.preset, image_size=image_size, num_labels=len(labels), **label_kwargs, **overrides
    )
    if segmentation:
        config.num_queries = config.num_patches
    model = task.model_class(config)
    processor = default_image_processor(task, image_size)
    return model, processor


def check_cropr_checkpoint(path: str, trust_remote_code: bool = False) -> None:
    """Refuse another architecture's checkpoint for `--model_name_or_path`, pointing ViT / DINOv2 ones to `--backbone`.

    Raises:
        RunError: the checkpoint's config is not a CroprViT one.
    """
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    if model_type != CroprViTConfig.model_type:
        from ..conversion import SUPPORTED_MODEL_TYPES

        raise RunError(
            f"--model_name_or_path {path} is a {model_type!r} checkpoint, not a CroprViT one: to start from "
            f"{' / '.join(SUPPORTED_MODEL_TYPES)} weights, pass it as --backbone, which converts it to CroprViT"
        )


def resolve_aux_ignored_labels(spec: str | None, labels: dict[int, str]) -> list[int] | None:
    """Class ids of `--aux_ignored_labels` (names or ids, comma-separated; "none" = no class); None when not given."""
    if spec is None:
        return None
    if spec.strip().lower() == "none":
        return []
    label_ids = {name: index for index, name in labels.items()}
    ignored = []
    for item in (part.strip() for part in spec.split(",")):
        if item in label_ids:
            ignored.append(label_ids[item])
        elif item.isdigit() and int(item) in labels:
            ignored.append(int(item))
        else:
            raise ValueError(
                f"--aux_ignored_labels: {item!r} is neither a class name nor a class id of this dataset; "
                f"the classes are {labels}"
            )
    return ignored


def backbone_schedule(backbone: str, image_size: int, overrides: dict[str, Any]) -> list[int]:
    """The paper's regime for any backbone and resolution: a per-block schedule setting aside 80% of the patches."""
    source = AutoConfig.from_pretrained(backbone)
    patch_size = source.patch_size if isinstance(source.patch_size, int) else source.patch_size[0]
    num_patches = (image_size // patch_size) ** 2
    return per_block_schedule(
        source.num_hidden_layers, num_patches, 0.8, overrides.get("last_layer_fusion", True) is not False
    )


def default_image_processor(task: TaskSpec, image_size: int) -> ViTImageProcessorPil | SegformerImageProcessorPil:
    """Resize to the model size and normalise with mean/std 0.5 (ViT's convention) for models trained from scratch."""
    settings = dict(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if task.name == "semantic-segmentation":
        return SegformerImageProcessorPil(do_reduce_labels=False, **settings)
    return ViTImageProcessorPil(**settings)


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


def eval_pixel_values(dataset, transform, limit: int) -> torch.Tensor:
    rows = dataset.select(range(min(limit, len(dataset))))
    return transform(rows[:])["pixel_values"]


def report_table(rows: Sequence[tuple[str, str, str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def run(task_name: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, fine-tune, evaluate, save the stripped checkpoint and report; returns the final numbers.

    Raises:
        RunError: conflicting arguments, an output folder or checkpoint to refuse, or a diverged run (non-finite
            weights or eval loss, found before anything is saved).
    """
    task = TASKS[task_name]
    parser = HfArgumentParser((ModelArguments, DataArguments, PruningArguments, CroprTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg.startswith("--output_dir") for arg in argv):
        argv += ["--output_dir", f"outputs/{task.builtin_task}"]
    model_args, data_args, pruning_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # Unlike transformers' examples, train by default: `--do_eval` alone (or `--do_train false`) evaluates only.
    # (`--eval_strategy` also switches `do_eval` on, so it cannot tell an eval-only run.)
    do_train = training_args.do_train or not any(arg.split("=")[0] in ("--do_train", "--do_eval") for arg in argv)
    check_argument_conflicts(
        task,
        model_args,
        pruning_args,
        do_train,
        training_args.resume_from_checkpoint,
        training_args.overwrite_output_dir,
    )
    # `with_transform` datasets expose only the raw columns: Trainer must not drop them before the transform.
    training_args.remove_unused_columns = False
    # Every Cropr module computes its auxiliary loss at every step (also while the curriculum prunes nothing), so
    # no parameter is left without a gradient under DDP.
    training_args.ddp_find_unused_parameters = False
    if not any(arg.split("=")[0] == "--max_grad_norm" for arg in argv):
        # Trainer clips the global gradient norm (default 1.0), and the Cropr modules' summed auxiliary gradients
        # dominate that norm: clipping would shrink the backbone's updates by the same factor (x38 measured on a
        # 12-block DINOv2). The paper's recipes do not clip; `--max_grad_norm` still turns clipping on.
        training_args.max_grad_norm = 0.0
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns otherwise
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    checkpoint = checkpoint_to_resume(training_args) if do_train else None

    dataset, labels, label_format = load_task_data(task, data_args, training_args.data_seed or training_args.seed)
    image_size = model_args.image_size or data_args.canvas_size
    model, processor = build_model(task, model_args, pruning_args, labels, image_size)
    logger.info(
        "CroprViT %s: tokens per block %s, FLOP ceiling %.2fx",
        model.config.token_selector,
        model.config.token_counts(),
        model.config.flop_ceiling(),
    )
    train_transform = make_transforms(task, processor, augment=True, seed=training_args.seed, label_format=label_format)
    eval_transform = make_transforms(task, processor, augment=False, seed=training_args.seed, label_format=label_format)
    train_dataset = TrainingSplit(dataset["train"], train_transform)
    eval_dataset = dataset["validation"].with_transform(eval_transform)

    ramp = task.default_curriculum if pruning_args.curriculum_ramp is None else pruning_args.curriculum_ramp
    callbacks = [EpochCallback(train_dataset)]
    if ramp > 0:
        callbacks.append(PruningCurriculumCallback(ramp, per_epoch=pruning_args.curriculum_per_epoch))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if do_train else None,
        eval_dataset=eval_dataset,
        compute_metrics=metrics.compute_metrics_for_task(task.builtin_task, id2label=labels),
        processing_class=processor,
        callbacks=callbacks,
    )
    train_metrics = {}
    if do_train:
        train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
        trainer.log_metrics("train", train_metrics)
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    # Before `final_report` writes anything: a diverged run must not replace an earlier good output.
    check_finite(trainer.model, eval_metrics, training_args.output_dir, trained=do_train)

    return {
        "train": train_metrics,
        "eval": eval_metrics,
        **final_report(task, trainer, eval_metrics, dataset["validation"], eval_transform, data_args),
    }


def checkpoint_to_resume(args: CroprTrainingArguments) -> str | None:
    """The checkpoint a training run continues from (None: from scratch), after checking `--output_dir`.

    `--resume_from_checkpoint latest` takes the newest complete checkpoint in `--output_dir`. `Trainer` writes a
    checkpoint's `trainer_state.json` last, so a `checkpoint-N` folder without one was interrupted while saving: it
    is skipped with a warning, and refused when named. Without `--resume_from_checkpoint`, checkpoints of an earlier
    run in `--output_dir` are refused: training would start again from step 0 among them (and a later `latest` could
    pick theirs). `--overwrite_output_dir` deletes them and starts over.

    Raises:
        RunError: no complete checkpoint to resume from, or earlier checkpoints without `--overwrite_output_dir`.
    """
    checkpoints = sort_checkpoints(args.output_dir)[::-1]  # newest first
    if args.resume_from_checkpoint == LATEST_CHECKPOINT:
        for checkpoint in checkpoints:
            if os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
                logger.info("Resuming from %s, the newest complete checkpoint", checkpoint)
                return checkpoint
            logger.warning("Skipping %s: it has no %s (interrupted while saving)", checkpoint, TRAINER_STATE_NAME)
        raise RunError(f"--resume_from_checkpoint {LATEST_CHECKPOINT}: no complete checkpoint in {args.output_dir}")
    if args.resume_from_checkpoint is not None:
        if not os.path.isfile(os.path.join(args.resume_from_checkpoint, TRAINER_STATE_NAME)):
            raise RunError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a complete checkpoint (no "
                f"{TRAINER_STATE_NAME}; a checkpoint interrupted while saving lacks it): pass another one, or "
                f"'{LATEST_CHECKPOINT}' for the newest complete one in --output_dir"
            )
        return args.resume_from_checkpoint
    if checkpoints and not args.overwrite_output_dir:
        raise RunError(
            f"--output_dir {args.output_dir} holds {len(checkpoints)} checkpoints of an earlier run (newest "
            f"{os.path.basename(checkpoints[0])}): continue it with --resume_from_checkpoint {LATEST_CHECKPOINT}, "
            "or start over with --overwrite_output_dir (deletes them)"
        )
    if checkpoints and args.should_save:
        logger.warning("--overwrite_output_dir: deleting the %d checkpoints of an earlier run", len(checkpoints))
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
    return None


def check_finite(model: torch.nn.Module, eval_metrics: dict[str, float], output_dir: str, trained: bool) -> None:
    """Refuse a model whose weights or eval loss are not finite, naming them.

    Raises:
        RunError: some floating-point weight holds nan or inf, or the eval loss is not finite.
    """
    weights = {name: tensor for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    problems = []
    if broken:
        names = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        problems.append(f"{len(broken)} of {len(weights)} weight tensors hold nan or inf ({names})")
    loss = eval_metrics.get("eval_loss")
    if loss is not None and not math.isfinite(loss):
        problems.append(f"the eval loss is {loss}")
    if problems:
        cause = (
            "training diverged: lower --learning_rate, or clip gradients with --max_grad_norm"
            if trained
            else "the checkpoint is broken"
        )
        raise RunError(f"{' and '.join(problems)}; the final checkpoint was not saved to {output_dir} ({cause})")


def final_report(
    task: TaskSpec,
    trainer: Trainer,
    eval_metrics: dict[str, float],
    eval_split,
    eval_transform: Callable,
    data_args: DataArguments,
) -> dict[str, Any]:
    """Compare with pruning off at the same weights, save the stripped checkpoint, print a table.

    Runs on every process (evaluation and saving are collective under DDP); rank 0 alone times and prints.
    """
    model = trainer.model.eval()
    unpruned = model.with_token_selector("none")
    metric_key = f"eval_{task.main_metric}"
    unpruned_metrics = Trainer(
        model=unpruned,
        args=trainer.args,
        eval_dataset=eval_split.with_transform(eval_transform),
        compute_metrics=trainer.compute_metrics,
        processing_class=trainer.processing_class,
    ).evaluate()
    trainer.model = model.strip_training_modules()
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))  # the stripped model, with the image processor beside it
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="CroprViT inference checkpoint")
    if not trainer.is_world_process_zero():
        return {}

    pixel_values = eval_pixel_values(eval_split, eval_transform, data_args.throughput_batch_size).to(model.device)
    throughputs = measure_throughput({"pruned": model, "unpruned": unpruned}, pixel_values)

    speedup = throughputs["pruned"] / throughputs["unpruned"]
    rows = [
        ("", task.main_metric, f"images/s (eval, batch {pixel_values.shape[0]})"),
        ("pruned (CroprViT)", f"{eval_metrics[metric_key]:.4f}", f"{throughputs['pruned']:.1f}"),
        ("pruning off", f"{unpruned_metrics[metric_key]:.4f}", f"{throughputs['unpruned']:.1f}"),
        ("speedup", "", f"{speedup:.2f}x (FLOP ceiling {model.config.flop_ceiling():.2f}x)"),
    ]
    print("\n" + report_table(rows))
    print(f"\nStripped inference checkpoint and image processor saved to {output_dir.resolve()}")
    return {
        "main_metric": task.main_metric,
        "pruned_metric": eval_metrics[metric_key],
        "unpruned_metric": unpruned_metrics[metric_key],
        "throughput": throughputs,
        "speedup": speedup,
        "output_dir": str(output_dir),
    }


def main(task_name: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of the `scripts/train_*.py`: [`run`], with a [`RunError`] reported as one line and exit status 1."""
    try:
        return run(task_name, argv)
    except RunError as error:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {error}")


__all__ = [
    "CroprTrainingArguments",
    "DataArguments",
    "ModelArguments",
    "PruningArguments",
    "RunError",
    "TASKS",
    "main",
    "run",
]
