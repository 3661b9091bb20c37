"""What differs between the three tasks: the task table, loading the data (built-in or custom), building the model
and its image processor (a CroprViT checkpoint, a converted backbone, or a preset from scratch)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    SegformerImageProcessorPil,
    ViTImageProcessorPil,
)

from ..data import id2label as builtin_id2label
from ..data import load_builtin_task
from ..data.formats import LabelFormat, find_id2label_file, prepare_dataset, read_class_names, read_id2label
from ..models.cropr_vit.configuration_cropr_vit import per_block_schedule
from ..models.cropr_vit.modeling_cropr_vit import (
    CroprViTForImageClassification,
    CroprViTForMultiLabelClassification,
    CroprViTForSemanticSegmentation,
    CroprViTPreTrainedModel,
)
from ..presets import preset_config
from .arguments import DataArguments, ModelArguments, PruningArguments, RunError

logger = logging.getLogger(__name__)


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
        from ..conversion import background_label_ids

        ignored = resolve_aux_ignored_labels(pruning_args.aux_ignored_labels, labels)
        if ignored is None and not model_args.model_name_or_path:
            ignored = background_label_ids(labels)
        if ignored is not None:
            overrides["aux_ignored_labels"] = ignored
    if model_args.backbone:
        from ..conversion import from_backbone

        if "pruning_rate" not in overrides and "pruning_schedule" not in overrides:
            overrides["pruning_schedule"] = backbone_schedule(model_args.backbone, image_size, overrides)
        # Training sees whole images, as with the other models: the data's labels describe the whole image (the
        # built-in scenes place objects anywhere), so the source's center crop could cut a labelled object away.
        return from_backbone(
            model_args.backbone, task.name, image_size=image_size, id2label=labels, center_crop=False, **overrides
        )
    if model_args.model_name_or_path:
        saved_labels = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        ).num_labels
        if saved_labels != len(labels) and not model_args.ignore_mismatched_sizes:
            raise RunError(
                f"--model_name_or_path {model_args.model_name_or_path} predicts {saved_labels} labels and the data "
                f"has {len(labels)}: pass --ignore_mismatched_sizes to train new heads for them (the classifier and "
                "the Cropr modules' auxiliary heads)"
            )
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
    from ..conversion import vision_config

    source = vision_config(AutoConfig.from_pretrained(backbone))
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
