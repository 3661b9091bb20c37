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

import copy
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, Trainer, set_seed

from ..models.cropr_vit.configuration_cropr_vit import LEARNED_SELECTORS, CroprViTConfig
from ..tools.timing import measure_throughput
from . import metrics
from .arguments import (
    CroprTrainingArguments,
    DataArguments,
    ModelArguments,
    PruningArguments,
    RunError,
    check_argument_conflicts,
    checkpoint_to_resume,
)
from .curriculum import PruningCurriculumCallback
from .tasks import TASKS, TaskSpec, build_model, load_task_data
from .transforms import EpochCallback, TrainingSplit, make_transforms

logger = logging.getLogger(__name__)


def eval_pixel_values(dataset, transform, limit: int) -> torch.Tensor:
    rows = dataset.select(range(min(limit, len(dataset))))
    return transform(rows[:])["pixel_values"]


def report_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as left-aligned text columns."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


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
        # dominate that norm: clipping would shrink the backbone's updates by the same large factor. The paper's
        # recipes do not clip; `--max_grad_norm` still turns clipping on.
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
    if do_train and model.config.inference_only and model.config.token_selector in LEARNED_SELECTORS:
        logger.warning(
            "%s is an inference-only checkpoint (saved after `strip_training_modules()`): its Cropr modules keep "
            "their routing and do not learn; fine-tune the full training checkpoint to train them too",
            model_args.model_name_or_path,
        )
    train_transform = make_transforms(task, processor, augment=True, seed=training_args.seed, label_format=label_format)
    eval_transform = make_transforms(task, processor, augment=False, seed=training_args.seed, label_format=label_format)
    train_dataset = TrainingSplit(dataset["train"], train_transform)
    eval_dataset = dataset["validation"].with_transform(eval_transform)

    ramp = task.default_curriculum if pruning_args.curriculum_ramp is None else pruning_args.curriculum_ramp
    callbacks = [EpochCallback(train_dataset)]
    if ramp > 0 or pruning_args.elastic_pruning is not None:
        callbacks.append(
            PruningCurriculumCallback(
                ramp,
                per_epoch=pruning_args.curriculum_per_epoch,
                elastic_min_fraction=pruning_args.elastic_pruning,
                seed=training_args.seed,
            )
        )
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
        **final_report(
            task, trainer, eval_metrics, dataset["validation"], eval_transform, data_args, pruning_args.elastic_pruning
        ),
    }


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
    elastic_min_fraction: float | None = None,
) -> dict[str, Any]:
    """Compare with pruning off at the same weights, save the stripped checkpoint, print a table.

    After elastic training, the metric and throughput are also reported at lighter schedules of the range it
    trained (`elastic_eval_fractions`). Runs on every process (evaluation and saving are collective under DDP); rank
    0 alone times and prints.
    """
    model = trainer.model.eval()
    unpruned = model.with_token_selector("none")
    metric_key = f"eval_{task.main_metric}"

    def evaluate(variant: torch.nn.Module) -> dict[str, float]:
        return Trainer(
            model=variant,
            args=trainer.args,
            eval_dataset=eval_split.with_transform(eval_transform),
            compute_metrics=trainer.compute_metrics,
            processing_class=trainer.processing_class,
        ).evaluate()

    unpruned_metrics = evaluate(unpruned)
    lighter = {}
    if elastic_min_fraction is not None:
        for fraction in elastic_eval_fractions(elastic_min_fraction)[:-1]:
            variant = copy.deepcopy(model).set_pruning_schedule(schedule_at_fraction(model.config, fraction))
            lighter[fraction] = (variant, evaluate(variant)[metric_key])
    trainer.model = model.strip_training_modules()
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))  # the stripped model, with the image processor beside it
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="CroprViT inference checkpoint")
    if not trainer.is_world_process_zero():
        return {}

    pixel_values = eval_pixel_values(eval_split, eval_transform, data_args.throughput_batch_size).to(model.device)
    variants = {
        "pruned": model,
        "unpruned": unpruned,
        **{fraction: variant for fraction, (variant, _) in lighter.items()},
    }
    throughputs = measure_throughput(variants, pixel_values)

    speedup = throughputs["pruned"] / throughputs["unpruned"]
    rows = [
        ("", task.main_metric, f"images/s (eval, batch {pixel_values.shape[0]})"),
        ("pruned (CroprViT)", f"{eval_metrics[metric_key]:.4f}", f"{throughputs['pruned']:.1f}"),
        ("pruning off", f"{unpruned_metrics[metric_key]:.4f}", f"{throughputs['unpruned']:.1f}"),
        ("speedup", "", f"{speedup:.2f}x (FLOP ceiling {model.config.flop_ceiling():.2f}x)"),
    ]
    elastic = [
        {
            "fraction": fraction,
            "pruning_schedule": variant.config.effective_pruning_schedule,
            "metric": metric,
            "throughput": throughputs[fraction],
        }
        for fraction, (variant, metric) in lighter.items()
    ]
    rows += [
        (f"pruned at {entry['fraction']:.2f} of the schedule", f"{entry['metric']:.4f}", f"{entry['throughput']:.1f}")
        for entry in elastic
    ]
    print("\n" + report_table(rows))
    print(f"\nStripped inference checkpoint and image processor saved to {output_dir.resolve()}")
    return {
        "main_metric": task.main_metric,
        "pruned_metric": eval_metrics[metric_key],
        "unpruned_metric": unpruned_metrics[metric_key],
        "throughput": throughputs,
        "speedup": speedup,
        "elastic": elastic,
        "output_dir": str(output_dir),
    }


def elastic_eval_fractions(min_fraction: float) -> list[float]:
    """The fractions of the schedule that an elastic run is evaluated at: its lowest, the middle and the full one."""
    return sorted({min_fraction, (min_fraction + 1.0) / 2, 1.0})


def schedule_at_fraction(config: CroprViTConfig, fraction: float) -> list[int]:
    """The schedule that removes `fraction` of each module's tokens: what training at that fraction ran, at the
    configured image size (`CroprViTConfig.patch_keep_counts`)."""
    return [round(count * fraction) for count in config.effective_pruning_schedule]


def main(task_name: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of the `scripts/train_*.py`: [`run`], with a [`RunError`] reported as one line and exit status 1."""
    try:
        return run(task_name, argv)
    except RunError as error:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {error}")
    finally:
        # A distributed rank that reaches interpreter shutdown with its process group alive can abort there
        # ("terminate called without an active exception", seen with gloo while another rank was still saving):
        # shut the group down in order first, as torch asks of every program that initialises one.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
