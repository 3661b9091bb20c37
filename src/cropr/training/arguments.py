"""The command-line arguments of the Trainer scripts (`HfArgumentParser` dataclasses) and the checks that run on
them before any data or weights load: conflicting options, a checkpoint that is not a CroprViT, the output folder and
the checkpoint to resume from. A [`RunError`] is reported by the scripts as one line."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from ..models.cropr_vit.configuration_cropr_vit import LEARNED_SELECTORS, TOKEN_SELECTORS, CroprViTConfig
from ..presets import PRESETS
from ..tools.argtypes import parse_schedule

if TYPE_CHECKING:
    from .tasks import TaskSpec

logger = logging.getLogger(__name__)

LATEST_CHECKPOINT = "latest"
"""`--resume_from_checkpoint` value that picks the newest complete checkpoint in `--output_dir`."""


class RunError(ValueError):
    """A problem with a run's arguments or outcome that the scripts report as one line, without a traceback."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A CroprViT checkpoint (Hub id or directory) to fine-tune."}
    )
    backbone: str | None = field(
        default=None,
        metadata={"help": "A pretrained backbone (Hub id or directory) converted to CroprViT on the fly."},
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
    elastic_pruning: float | None = field(
        default=None,
        metadata={
            "help": "Elastic training: after the curriculum, each step prunes a fraction of the schedule drawn "
            "uniformly from [this value, 1] (reproducible from --seed), so one checkpoint serves that range of "
            "rates (`set_pruning_rate`); the final report gives the metric at several of them. In [0, 1)."
        },
    )

    def config_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {
            name: value
            for name in ("token_selector", "last_layer_fusion", "aux_loss_weight", "pruning_rate")
            if (value := getattr(self, name)) is not None
        }
        if self.pruning_schedule:
            try:
                overrides["pruning_schedule"] = parse_schedule(self.pruning_schedule)
            except argparse.ArgumentTypeError as error:
                raise RunError(f"--pruning_schedule: {error}") from None
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
    if not 0.0 <= ramp <= 1.0:
        raise RunError(f"--curriculum_ramp is a share of training, from 0 (no curriculum) to 1; got {ramp}")
    if pruning_args.curriculum_per_epoch and ramp == 0:
        raise RunError("--curriculum_per_epoch steps a curriculum, but --curriculum_ramp is 0 (no curriculum)")
    if pruning_args.elastic_pruning is not None:
        if not 0.0 <= pruning_args.elastic_pruning < 1.0:
            raise RunError(
                f"--elastic_pruning is the lowest pruning fraction drawn, in [0, 1); got {pruning_args.elastic_pruning}"
            )
        if pruning_args.token_selector == "none":
            raise RunError("--token_selector none prunes nothing, so --elastic_pruning would be ignored")
        if not do_train:
            raise RunError("--elastic_pruning varies the pruning while training, but this run does not train")
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


def check_cropr_checkpoint(path: str, trust_remote_code: bool = False) -> None:
    """Refuse another architecture's checkpoint for `--model_name_or_path`, pointing backbones to `--backbone`.

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
