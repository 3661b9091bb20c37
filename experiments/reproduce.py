"""The paper's core comparison at small scale: every token selector fine-tuned with one recipe, on the built-in tasks.

For each task and seed, one model per selector is fine-tuned from the same backbone with the same data, schedule,
optimizer and budget (only `token_selector` differs), then evaluated; the seed-0 models of a task are timed together
with `measure_throughput` on one eval batch. The results go to a JSON file, from which `render_docs` writes the
markdown report, the metric-vs-throughput plot and pruning heat-maps of the trained Cropr models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, Trainer, TrainerCallback, TrainingArguments, set_seed

from cropr.models.cropr_vit.configuration_cropr_vit import per_block_schedule
from cropr.models.cropr_vit.modeling_cropr_vit import CroprViTPreTrainedModel
from cropr.presets import PRESETS
from cropr.tools.timing import machine_environment, measure_throughput
from cropr.tools.visualization import visualize_pruning
from cropr.training import metrics
from cropr.training.arguments import DataArguments, ModelArguments, PruningArguments
from cropr.training.curriculum import PruningCurriculumCallback
from cropr.training.tasks import TASKS, TaskSpec, build_model, load_task_data
from cropr.training.transforms import EpochCallback, TrainingSplit, make_transforms

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout root (`experiments/` is one level below it)."""

DEFAULT_BACKBONE = REPO_ROOT.parent / "shared" / "data" / "dinov2-small"
"""A local copy of DINOv2-S/14 that development machines keep in `shared/data/` beside the checkout; elsewhere pass
`--backbone` (a folder or a Hub id such as facebook/dinov2-small)."""

SELECTORS: dict[str, tuple[str, ...]] = {
    "image-classification": ("none", "cropr", "random", "variance", "attention", "non_salient"),
    "semantic-segmentation": ("none", "cropr", "random", "variance"),
    "multi-label-classification": ("none", "cropr", "random"),
}
"""Selectors compared per task (the paper's Table 1 for classification, Table 3's baselines for segmentation)."""

METRIC_LABELS = {"accuracy": "top-1 accuracy", "mean_iou": "mIoU", "mAP": "mAP"}


@dataclass
class Budget:
    """Data and optimisation budget of one task; identical for every selector of that task."""

    num_train: int
    num_eval: int
    epochs: float = 1.0
    max_steps: int = -1


@dataclass
class ReproduceConfig:
    """Everything that defines a reproduction run (stored in the results JSON)."""

    tasks: list[str] = field(default_factory=lambda: list(SELECTORS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budgets: dict[str, Budget] = field(default_factory=dict)
    backbone: str | None = str(DEFAULT_BACKBONE)
    preset: str = "vit-ti8-112"
    image_size: int | None = None
    canvas_size: int = 112
    removed_fraction: float = 0.85
    num_modules: int | None = None  # Cropr modules after the first this many blocks; None: all but the last two
    pooling: str = "cls"
    curriculum: float = 0.5
    batch_size: int = 8
    learning_rate: float = 1e-3
    layer_decay: float = 0.65
    router_lr_scale: float = 10.0
    frozen_blocks: int | None = None  # None: all but the last two blocks
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    aux_loss_weight: float = 1.0
    # Segmentation: the Cropr modules' per-patch auxiliary loss ignores the background class (the package default
    # for a class named "background"); False trains it on background too, the recipe of the first runs.
    aux_ignore_background: bool = True
    data_seed: int = 0
    throughput_batch_size: int = 32
    throughput_repeats: int = 7
    num_heatmaps: int = 3

    only_selectors: list[str] | None = None

    def selectors(self, task: str) -> tuple[str, ...]:
        """The task's selectors, restricted to `only_selectors` when given ("none" and "cropr" are always run)."""
        if self.only_selectors is None:
            return SELECTORS[task]
        wanted = {"none", "cropr", *self.only_selectors}
        return tuple(selector for selector in SELECTORS[task] if selector in wanted)


# ----------------------------------------------------------------------------------------------------------------------
# Model, schedule and optimiser
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ReproducePruningArguments(PruningArguments):
    """`PruningArguments` plus the pooling of the image-level heads, which `cropr.training.run` does not expose."""

    pooling: str = "avg"

    def config_overrides(self) -> dict[str, Any]:
        return {**super().config_overrides(), "pooling": self.pooling}


def resolve_backbone(backbone: str | None) -> str | None:
    """The backbone directory to use, or `None` (with a warning on stderr) when it is missing and a preset is used."""
    if backbone is None:
        return None
    if Path(backbone).is_dir():
        return backbone
    warnings.warn(
        f"backbone folder {backbone} not found: training the from-scratch preset instead (far weaker numbers)",
        stacklevel=2,
    )
    return None


def model_geometry(config: ReproduceConfig, backbone: str | None) -> tuple[int, int, int]:
    """`(depth, image_size, num_patches)` of the model that will be trained."""
    if backbone is not None:
        source = AutoConfig.from_pretrained(backbone)
        depth, patch_size = source.num_hidden_layers, source.patch_size
        image_size = config.image_size or config.canvas_size
    else:
        preset = PRESETS[config.preset]
        depth, patch_size = preset["num_hidden_layers"], preset["patch_size"]
        image_size = config.image_size or preset["image_size"]
    return depth, image_size, (image_size // patch_size) ** 2


def freeze_early_blocks(model: CroprViTPreTrainedModel, num_blocks: int | None) -> None:
    """Freeze the patch embedding and the first `num_blocks` blocks (default: all but the last two); the Cropr modules
    after them still train.

    With layer decay the early blocks would move at a few percent of the head's lr anyway; freezing them skips their
    backward pass, which on a CPU budget buys more training steps for every selector alike.
    """
    backbone = model.base_model
    num_blocks = len(backbone.layers) - 2 if num_blocks is None else num_blocks
    if num_blocks <= 0:
        return
    if num_blocks >= len(backbone.layers):
        raise ValueError(f"cannot freeze {num_blocks} of {len(backbone.layers)} blocks: the model would not train")
    for module in (backbone.embeddings, *backbone.layers[:num_blocks]):
        module.requires_grad_(False)


def parameter_groups(
    model: CroprViTPreTrainedModel,
    learning_rate: float,
    layer_decay: float,
    weight_decay: float,
    router_lr_scale: float = 10.0,
) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (the paper's recipe): block i of L gets `lr * decay**(L - i)`, the
    embeddings `lr * decay**(L + 1)`; the final norm and the task head get `lr` undecayed, the Cropr modules
    (queries, aggregators, auxiliary heads) `lr * router_lr_scale`. Biases, norms, position embeddings, CLS and
    queries get no weight decay."""
    depth = model.config.num_hidden_layers
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        parts = name.split(".")
        if parts[1:2] == ["embeddings"]:
            scale = layer_decay ** (depth + 1)
        elif parts[1:2] == ["layers"]:
            scale = layer_decay ** (depth - int(parts[2]))
        elif parts[1:2] == ["token_selector"]:
            scale = router_lr_scale
        else:
            scale = 1.0
        no_decay = parameter.ndim <= 1 or parts[-1] in ("position_embeddings", "cls_token", "queries")
        key = (learning_rate * scale, 0.0 if no_decay else weight_decay)
        groups.setdefault(key, []).append(parameter)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


# ----------------------------------------------------------------------------------------------------------------------
# One task
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainedVariant:
    metric: float
    train_seconds: float
    model: CroprViTPreTrainedModel


def fine_tune(
    task: TaskSpec,
    selector: str,
    seed: int,
    config: ReproduceConfig,
    backbone: str | None,
    schedule: list[int],
    image_size: int,
    dataset,
    labels: dict[int, str],
    work_dir: str,
    callbacks: Sequence[TrainerCallback] = (),
    elastic_min_fraction: float | None = None,
) -> tuple[Trainer, float]:
    """Fine-tune one selector at one seed with the recipe of `config`; returns the trainer and the training seconds.

    The trainer holds the trained model (with its training modules) and evaluates on `dataset["validation"]`;
    `callbacks` are added to it (for example a progress display). `elastic_min_fraction` trains elastically after
    the curriculum (`PruningCurriculumCallback`, its draws seeded by `seed`): one model for every rate of the range.
    """
    budget = config.budgets[task.name]
    set_seed(seed)
    model_args = ModelArguments(backbone=backbone, preset=config.preset)
    pruning_args = ReproducePruningArguments(
        pooling=config.pooling,
        token_selector=selector,
        pruning_schedule=",".join(map(str, schedule)),
        last_layer_fusion=True,
        aux_loss_weight=config.aux_loss_weight,
        # Read for segmentation only; None keeps `build_model`'s default (ignore the "background" class).
        aux_ignored_labels=None if config.aux_ignore_background else "none",
    )
    model, processor = build_model(task, model_args, pruning_args, labels, image_size)
    freeze_early_blocks(model, config.frozen_blocks)
    args = TrainingArguments(
        output_dir=os.path.join(work_dir, f"{task.builtin_task}-{selector}-{seed}"),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 2,
        num_train_epochs=budget.epochs,
        max_steps=budget.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_fraction,
        # No clipping (as the reference's classification recipe): a global norm would be dominated by the Cropr
        # modules' auxiliary gradients and shrink the backbone's steps for the pruned variants only.
        max_grad_norm=0.0,
        seed=seed,
        data_seed=seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.learning_rate, config.layer_decay, config.weight_decay, config.router_lr_scale),
        lr=config.learning_rate,
    )
    ramp = 0.0 if selector == "none" else config.curriculum
    train_dataset = TrainingSplit(dataset["train"], make_transforms(task, processor, augment=True, seed=seed))
    pruning = []
    if ramp > 0 or elastic_min_fraction is not None:
        pruning = [PruningCurriculumCallback(ramp, elastic_min_fraction=elastic_min_fraction, seed=seed)]
    callbacks = [EpochCallback(train_dataset), *pruning, *callbacks]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=dataset["validation"].with_transform(make_transforms(task, processor, augment=False, seed=seed)),
        compute_metrics=metrics.compute_metrics_for_task(task.builtin_task, id2label=labels),
        processing_class=processor,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def train_variant(
    task: TaskSpec,
    selector: str,
    seed: int,
    config: ReproduceConfig,
    backbone: str | None,
    schedule: list[int],
    image_size: int,
    dataset,
    labels: dict[int, str],
    work_dir: str,
) -> tuple[TrainedVariant, Any]:
    """Fine-tune and evaluate one selector at one seed; returns the stripped model and its image processor."""
    trainer, train_seconds = fine_tune(
        task, selector, seed, config, backbone, schedule, image_size, dataset, labels, work_dir
    )
    metric = trainer.evaluate()[f"eval_{task.main_metric}"]
    stripped = trainer.model.eval().strip_training_modules()
    return TrainedVariant(float(metric), train_seconds, stripped), trainer.processing_class


def object_patches(labels: torch.Tensor, patch_size: tuple[int, int], background: int, ignore_index: int):
    """(B, H, W) class maps -> (B, patches) booleans in raster order: True where more than half of a patch's labelled
    pixels belong to an object (neither `background` nor `ignore_index`)."""
    patch_h, patch_w = patch_size
    batch, height, width = labels.shape
    grid_h, grid_w = height // patch_h, width // patch_w
    tiles = labels[:, : grid_h * patch_h, : grid_w * patch_w].reshape(batch, grid_h, patch_h, grid_w, patch_w)
    tiles = tiles.permute(0, 1, 3, 2, 4).reshape(batch, grid_h * grid_w, patch_h * patch_w)
    labelled = tiles != ignore_index
    on_object = labelled & (tiles != background)
    return on_object.sum(-1) * 2 > labelled.sum(-1)


@torch.no_grad()
def object_share_of_kept_patches(model: CroprViTPreTrainedModel, pixel_values: torch.Tensor, is_object: torch.Tensor):
    """The share of object patches (`object_patches`) among the patch tokens that the model's last pruning module
    keeps. A pruner blind to content keeps objects at their share of all patches; one that seeks them, more."""
    prefix = model.config.num_prefix_tokens
    kept = model.eval()(pixel_values, output_kept_indices=True).kept_indices[-1][:, prefix:] - prefix
    return float(is_object.gather(1, kept).float().mean())


def seed_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum and maximum of one metric over the seeds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_task(
    task_name: str, config: ReproduceConfig, backbone: str | None, out_dir: Path, work_dir: str
) -> dict[str, Any]:
    """Train every selector at every seed, time the seed-0 models together, draw Cropr heat-maps."""
    task = TASKS[task_name]
    budget = config.budgets[task_name]
    depth, image_size, num_patches = model_geometry(config, backbone)
    schedule = per_block_schedule(depth, num_patches, config.removed_fraction, num_modules=config.num_modules)
    data_args = DataArguments(
        num_train_samples=budget.num_train, num_eval_samples=budget.num_eval, canvas_size=config.canvas_size
    )
    dataset, labels, _ = load_task_data(task, data_args, config.data_seed)

    per_seed: dict[str, list[float]] = {selector: [] for selector in config.selectors(task_name)}
    train_seconds: dict[str, list[float]] = {selector: [] for selector in config.selectors(task_name)}
    timed_models: dict[str, CroprViTPreTrainedModel] = {}
    cropr_processor = None
    model_config = None
    for seed in config.seeds:
        for selector in config.selectors(task_name):
            print(f"[{time.strftime('%H:%M:%S')}] {task_name} seed {seed}: {selector}", flush=True)
            variant, processor = train_variant(
                task, selector, seed, config, backbone, schedule, image_size, dataset, labels, work_dir
            )
            per_seed[selector].append(variant.metric)
            train_seconds[selector].append(variant.train_seconds)
            print(f"    {task.main_metric} {variant.metric:.4f} ({variant.train_seconds:.0f} s training)", flush=True)
            if seed == config.seeds[0]:
                timed_models[selector] = variant.model
                if selector == "cropr":
                    cropr_processor = processor
                    model_config = variant.model.config

    eval_transform = make_transforms(task, cropr_processor, augment=False, seed=0)
    validation = dataset["validation"]
    eval_batch = eval_transform(validation.select(range(min(config.throughput_batch_size, len(validation))))[:])
    pixel_values = eval_batch["pixel_values"]
    throughput = measure_throughput(timed_models, pixel_values, repeats=config.throughput_repeats)
    object_shares = {}
    if task_name == "semantic-segmentation":
        is_object = object_patches(
            eval_batch["labels"],
            model_config.patch_size_hw,
            background=model_config.label2id["background"],
            ignore_index=model_config.semantic_loss_ignore_index,
        )
        object_shares = {"all patches": float(is_object.float().mean())}
        for selector, model in timed_models.items():
            if model.config.pruning_blocks:
                object_shares[selector] = object_share_of_kept_patches(model, pixel_values, is_object)
    heatmaps = draw_heatmaps(task_name, timed_models["cropr"], cropr_processor, dataset["validation"], config, out_dir)

    selectors = {}
    for selector, values in per_seed.items():
        selectors[selector] = {
            "per_seed": values,
            **seed_spread(values),
            "images_per_second": throughput[selector],
            "speedup": throughput[selector] / throughput["none"],
            "train_seconds_median": statistics.median(train_seconds[selector]),
        }
    return {
        "metric": task.main_metric,
        "num_labels": len(labels),
        "image_size": image_size,
        "num_patches": num_patches,
        "pruning_schedule": schedule,
        "depth": depth,
        "frozen_blocks": depth - 2 if config.frozen_blocks is None else config.frozen_blocks,
        "token_counts": model_config.token_counts(),
        "flop_ceiling": model_config.flop_ceiling(),
        "throughput_batch_size": int(pixel_values.shape[0]),
        "budget": asdict(budget),
        "selectors": selectors,
        "object_share_of_kept_patches": object_shares,
        "heatmaps": heatmaps,
    }


def draw_heatmaps(
    task_name: str,
    model: CroprViTPreTrainedModel,
    processor,
    validation,
    config: ReproduceConfig,
    out_dir: Path,
) -> list[str]:
    """Pruning heat-maps of the first validation images, side by side in `heatmaps_<task>.png`; returns its name."""
    if config.num_heatmaps < 1:
        return []
    count = min(config.num_heatmaps, len(validation))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            visualize_pruning(
                model, processor, validation[index]["image"], Path(tmp) / f"{index}.png", panel_height=224
            )
            for index in range(count)
        ]
        panels = [Image.open(path).convert("RGB") for path in paths]
        width = sum(panel.width for panel in panels)
        canvas = Image.new("RGB", (width, max(panel.height for panel in panels)), (255, 255, 255))
        left = 0
        for panel in panels:
            canvas.paste(panel, (left, 0))
            left += panel.width
    name = f"heatmaps_{task_name}.png"
    canvas.save(out_dir / name)
    return [name]


# ----------------------------------------------------------------------------------------------------------------------
# Whole run
# ----------------------------------------------------------------------------------------------------------------------
def portable_path(path: str | os.PathLike) -> str:
    """A path as results files record it: relative to the repository when inside it, else its last component.

    An absolute path, or one that leaves the working directory, would name a folder of the machine that wrote the
    file, meaningless to a reader elsewhere. Other relative paths and Hub ids are kept as they are.
    """
    text = os.fspath(path)
    if not _leaves_working_directory(text):
        return Path(text).as_posix()
    resolved = Path(text).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else resolved.name


def _leaves_working_directory(text: str) -> bool:
    return os.path.isabs(text) or text == ".." or text.startswith("../")


def portable_command(command: str) -> str:
    """A recorded command with each path argument outside the working directory made portable ([`portable_path`])."""
    words = shlex.split(command)
    return shlex.join(portable_path(word) if _leaves_working_directory(word) else word for word in words)


def make_portable(results: dict[str, Any]) -> None:
    """Make the paths a run records (command, model, backbone) portable, in place."""
    results["command"] = portable_command(results["command"])
    results["model"] = portable_path(results["model"])
    if results["config"].get("backbone"):
        results["config"]["backbone"] = portable_path(results["config"]["backbone"])


def run_reproduction(
    config: ReproduceConfig, out_dir: str | Path, command: Sequence[str], notes: str | None = None
) -> dict[str, Any]:
    """Run every task of `config`, write `results.json` and the docs into `out_dir`; returns the results."""
    unknown = [task for task in config.tasks if task not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(SELECTORS)}")
    if not config.seeds:
        raise ValueError("give at least one seed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = resolve_backbone(config.backbone)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": shlex.join(command),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "environment": machine_environment(),
        "config": asdict(config),
        "model": backbone or f"preset {config.preset} (from scratch)",
        "tasks": {},
    }
    make_portable(results)
    if notes is not None:
        results["notes"] = notes
    with tempfile.TemporaryDirectory() as work_dir:
        for task_name in config.tasks:
            results["tasks"][task_name] = run_task(task_name, config, backbone, out_dir, work_dir)
            results["wall_seconds"] = time.perf_counter() - start
            # Written after every task so that an interrupted run keeps what it finished.
            (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    render_docs(results, out_dir)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Docs from the JSON
# ----------------------------------------------------------------------------------------------------------------------
def further_plot_name(index: int) -> str:
    """File name of the trade-off plot of the `index`-th further run."""
    return f"results_tradeoff_further{index + 1}.png"


SELECTOR_STYLES: dict[str, dict[str, Any]] = {
    "none": {"color": "black", "marker": "s", "markersize": 7},
    "cropr": {"color": "tab:red", "marker": "*", "markersize": 13},
    "random": {"color": "tab:gray", "marker": "o", "markersize": 7},
    "variance": {"color": "tab:blue", "marker": "^", "markersize": 8},
    "attention": {"color": "tab:green", "marker": "D", "markersize": 7},
    "non_salient": {"color": "tab:purple", "marker": "v", "markersize": 8},
}
"""One colour and marker per selector in every plot of the results page."""


def selector_legend(figure, axis, columns: int = 6) -> None:
    """One legend for the whole figure, below the panels, so that it never covers a data point."""
    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(columns, len(labels)), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.1, 1, 1))


def plot_tradeoff(results: dict[str, Any], path: Path, titles: dict[str, str] | None = None) -> Path:
    """Metric (median, min-max bars over seeds) against eval images/s, one panel per task (the paper's Figure 5);
    `titles` replaces a panel's title (the task name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(max(4.6 * len(tasks), 7.0), 4.6), squeeze=False)
    widest = next(iter(tasks.values()))
    for axis, (task_name, task) in zip(axes[0], tasks.items(), strict=True):
        widest = task if len(task["selectors"]) > len(widest["selectors"]) else widest
        for selector, row in task["selectors"].items():
            errors = [[row["median"] - row["min"]], [row["max"] - row["median"]]]
            axis.errorbar(
                row["images_per_second"],
                100 * row["median"],
                yerr=100 * np.asarray(errors),
                fmt=SELECTOR_STYLES.get(selector, {}).get("marker", "o"),
                capsize=3,
                label=selector,
                **{key: value for key, value in SELECTOR_STYLES.get(selector, {}).items() if key != "marker"},
            )
        axis.set_title((titles or {}).get(task_name, task_name), fontsize=10)
        axis.set_xlabel(f"eval images/s (batch {task['throughput_batch_size']}, CPU)")
        axis.set_ylabel(f"{METRIC_LABELS.get(task['metric'], task['metric'])} (%)")
        axis.grid(alpha=0.3)
    figure.suptitle("Metric vs throughput per selector (median, bars: min-max over seeds)", fontsize=11)
    selector_legend(figure, axes[0][list(tasks.values()).index(widest)])
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def percent(value: float) -> str:
    """A metric in [0, 1] as a percentage with one decimal."""
    return f"{value * 100:.1f}"


def task_table(task: dict[str, Any]) -> str:
    """A markdown table: selector, metric median [min, max] and per seed (in %), images/s, speedup vs none."""
    label = METRIC_LABELS.get(task["metric"], task["metric"])
    lines = [
        f"| selector | {label} (%) median [min, max] | per seed | images/s | speedup vs none | training s/run |",
        "|---|---|---|---|---|---|",
    ]
    for selector, row in task["selectors"].items():
        seeds = ", ".join(percent(value) for value in row["per_seed"])
        lines.append(
            f"| {selector} | {percent(row['median'])} [{percent(row['min'])}, {percent(row['max'])}] "
            f"| {seeds} | {row['images_per_second']:.1f} | {row['speedup']:.2f}x | {row['train_seconds_median']:.0f} |"
        )
    return "\n".join(lines)


def task_findings(task: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers (no hand-typed values)."""
    rows = task["selectors"]
    findings = []
    if "cropr" in rows and "none" in rows:
        gap = (rows["cropr"]["median"] - rows["none"]["median"]) * 100
        findings.append(
            f"Cropr vs no pruning: {gap:+.1f} points (median) at {rows['cropr']['speedup']:.2f}x the throughput "
            f"(FLOP ceiling {task['flop_ceiling']:.2f}x)."
        )
    others = [name for name in rows if name not in ("none", "cropr")]
    if "cropr" in rows and others:
        cropr = rows["cropr"]
        for name in others:
            gap = (cropr["median"] - rows[name]["median"]) * 100
            if min(len(cropr["per_seed"]), len(rows[name]["per_seed"])) < 2:
                spread = "one seed, so no spread to compare."
            elif cropr["min"] > rows[name]["max"] or cropr["max"] < rows[name]["min"]:
                spread = "the seed ranges do not overlap."
            else:
                spread = "the seed ranges overlap."
            findings.append(f"Cropr vs {name}: {gap:+.1f} points (median); {spread}")
    ranked = sorted(rows, key=lambda name: rows[name]["median"], reverse=True)
    findings.append("Ranking by median: " + " > ".join(ranked) + ".")
    shares = task.get("object_share_of_kept_patches")
    if shares:
        kept = ", ".join(f"{name} {share:.0%}" for name, share in shares.items() if name != "all patches")
        findings.append(
            f"Object patches among the patch tokens the last pruning module keeps (seed 0, throughput batch): {kept}; "
            f"among all patches: {shares['all patches']:.0%}."
        )
    return findings


def render_markdown(
    results: dict[str, Any],
    notes: str | None = None,
    speed_dial: dict[str, Any] | None = None,
    detection: dict[str, Any] | None = None,
    speed_dial_segmentation: dict[str, Any] | None = None,
) -> str:
    """The `results.md` page, entirely from the results JSON (plus optional free-text notes): the summary, the
    speed-dial (classification and segmentation) and detection sections when their results are given, and the
    superseded runs in an appendix."""
    from experiments.results_page import APPENDIX_HEADING, summary_section

    config, env = recorded_config(results), results["environment"]
    superseded = superseded_tasks(results)
    lines = [
        "# Token Cropr at small scale: results",
        "",
        "Generated from the results files beside this page, so every number comes from them: `results.json` "
        "(`scripts/reproduce.py`), `results_speed_dial.json` (`scripts/speed_dial.py`), "
        "`results_speed_dial_segmentation.json` (`scripts/speed_dial_segmentation.py`) and `results_detection.json` "
        "(`scripts/reproduce_detection.py`).",
        "",
        summary_section(results, speed_dial, speed_dial_segmentation),
        "",
    ]
    if speed_dial is not None:
        from experiments.speed_dial import main_page_section

        lines += [main_page_section(speed_dial), ""]
    if speed_dial_segmentation is not None:
        from experiments import speed_dial_segmentation as segmentation_dial

        lines += [segmentation_dial.main_page_section(speed_dial_segmentation), ""]
    lines += [
        "## Fine-tuned selectors: the paper's core comparison",
        "",
        "Every selector of a task is fine-tuned with one recipe (same data, schedule, optimiser, steps, seeds); "
        "only `token_selector` differs. Training-free selectors are fine-tuned at the same schedule too, as in "
        "the paper's Table 1. Throughput: all seed-0 models of a task (stripped for inference) timed together with "
        "`cropr.tools.timing.measure_throughput` (interleaved, median) on the same eval batch, in the same process.",
        "",
        "### Command",
        "",
        "```",
        results["command"],
        "```",
        "",
        "### Environment and budget",
        "",
        f"- Model: {results['model']}",
        f"- CPU: {env['cpu_model']} ({env['cpu_cores_available']} logical CPUs, torch threads {env['torch_threads']}); "
        f"shared with other jobs while running, so absolute images/s are noisy, ratios less so.",
        f"- Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
        f"- Started {results['started']}, wall time {results['wall_seconds'] / 60:.1f} min",
        f"- Seeds {config['seeds']} (data seed {config['data_seed']}, the same scenes for every seed)",
        f"- Optimiser: AdamW, lr {config['learning_rate']:g} for the heads, x{config['router_lr_scale']:g} for the "
        f"Cropr modules, layer decay {config['layer_decay']:g} for the trained backbone blocks, weight decay "
        f"{config['weight_decay']:g}, cosine schedule with {config['warmup_fraction']:.0%} warm-up, batch "
        f"{config['batch_size']}, random horizontal flips, aux loss weight {config['aux_loss_weight']:g}, no gradient "
        "clipping.",
        f"- Curriculum: every pruned variant ramps R from 0 to its target over the first {config['curriculum']:.0%} of "
        "training (the paper's segmentation curriculum, here for all tasks); the unpruned model has nothing to ramp.",
        f"- Image-level heads pool the {config['pooling'].upper() if config['pooling'] == 'cls' else 'average'} "
        "token; segmentation uses the Segmenter linear head on every patch.",
        "- Trained: the blocks after the frozen ones (see the table), the final norm, the Cropr modules and the head; "
        "the patch embedding and the first blocks stay frozen, so the CPU budget goes into more steps.",
        f"- Schedule: per block with LLF, {config['removed_fraction']:.0%} of the patches removed by the last module"
        + (f" (modules after the first {config['num_modules']} blocks)." if config.get("num_modules") else "."),
        "- Segmentation's Cropr auxiliary loss "
        + (
            "ignores the background class (`aux_ignored_labels`; see the discussion)."
            if config["aux_ignore_background"]
            else "trains on every class, background included."
        ),
        "",
        budget_table(results),
    ]
    lines += ["", "### Main run", "", *task_sections(results, "####")]
    lines += [
        "### Metric vs throughput",
        "",
        "![metric vs throughput](results_tradeoff.png)",
        "",
        "### Where each patch was dropped (trained Cropr models, seed 0, validation images)",
        "",
        "Tint = the block after which a patch was set aside (dark purple early, yellow late); untinted patches with a "
        "white outline were kept to the end. Segmentation adds the predicted mask.",
        "",
    ]
    for task_name, task in results["tasks"].items():
        for name in task["heatmaps"]:
            lines += [f"**{task_name}**", "", f"![{task_name} heat-maps]({name})", ""]
    lines += [
        "### Paper reference",
        "",
        "ImageNet-1k, MAE ViT-L/16 R=8 + LLF: unpruned 85.8, Cropr 85.3, attention top-k 84.7, variance 84.3, "
        "random 83.8, non-salient 76.4 (1.7x). ADE20k, EVA-02-L Segmenter R=40 + LLF: 56.6 vs 56.7 median mIoU "
        "over 5 seeds (2.0x). Those runs train for tens of epochs on large models; the runs here train for minutes "
        "on a CPU, so only the ordering, not the numbers, is comparable.",
        "",
    ]
    appendix = []
    for index, run in enumerate(results.get("further_runs", [])):
        current, old = split_run(run, {task for (number, task) in superseded if number == index})
        if current["tasks"]:
            lines += further_run_section(results, current, index, "###", further_plot_name(index))
            if old["tasks"]:
                lines += [f"Its {', '.join(old['tasks'])} results are superseded: see the appendix.", ""]
        if old["tasks"]:
            reasons = sorted({superseded[index, task] for task in old["tasks"]})
            plot = None if current["tasks"] else further_plot_name(index)
            appendix += [
                *further_run_section(results, old, index, "###", plot),
                f"Superseded: {'; '.join(reasons)}.",
                "",
            ]
    if notes:
        lines += ["## Discussion of the fine-tuned runs", "", notes.strip(), ""]
    if detection is not None:
        from experiments.reproduce_detection import render_section

        lines += [render_section(detection)]
    if appendix:
        lines += [
            APPENDIX_HEADING,
            "",
            "Task results of a recipe that differs from the main run's in a setting that matters for the task, and "
            "that a run of the main recipe repeats at the same budget. They stay here because the discussion cites "
            "them.",
            "",
            *appendix,
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def further_run_section(
    results: dict[str, Any], run: dict[str, Any], index: int, heading: str, plot: str | None
) -> list[str]:
    """The lines of one further run: command, recipe differences, budget and per-task tables, and its plot."""
    return [
        f"{heading} Further run {index + 1}: `{run['command']}`",
        "",
        f"Same recipe as the main run except for the options of this command{recipe_differences(results, run)} "
        f"(config in `results.json`); started {run['started']}, wall time {run['wall_seconds'] / 60:.1f} min.",
        "",
        budget_table(run),
        "",
        *task_sections(run, heading + "#", prefix=f"Further run {index + 1}, "),
        *([f"![metric vs throughput, further run {index + 1}]({plot})", ""] if plot else []),
    ]


LEGACY_CONFIG = {"aux_ignore_background": False}
"""What runs recorded before an option existed did: results.json files of older runs lack these keys."""


def recorded_config(results: dict[str, Any]) -> dict[str, Any]:
    """A run's config, with the behaviour of older runs filled in for options they predate."""
    return {**LEGACY_CONFIG, **results["config"]}


NOT_RECIPE = (
    "tasks",
    "seeds",
    "budgets",
    "only_selectors",
    "throughput_batch_size",
    "throughput_repeats",
    "num_heatmaps",
)
"""Config keys that say what ran and how it was timed, not how a model was trained."""
TASK_SPECIFIC = {"aux_ignore_background": ("semantic-segmentation",)}
"""Recipe settings that change the training of these tasks only."""
LARGEST_BUDGET_PLOT = "results_largest_budget.png"


def task_recipe(results: dict[str, Any], task_name: str) -> dict[str, Any]:
    """The settings of a run that matter for training `task_name`."""
    return {
        key: value
        for key, value in recorded_config(results).items()
        if key not in NOT_RECIPE and task_name in TASK_SPECIFIC.get(key, (task_name,))
    }


def run_label(number: int) -> str:
    """How the page names run `number` (0: the main run, n: the n-th further run)."""
    return "the main run" if number == 0 else f"further run {number}"


def superseded_tasks(results: dict[str, Any]) -> dict[tuple[int, str], str]:
    """`{(further run index, task): why}` for each task result of a further run trained with another recipe than the
    main run's (in a setting that matters for the task) that a run of the main recipe repeats at the same budget."""
    runs = [results, *results.get("further_runs", [])]
    superseded = {}
    for index, run in enumerate(runs[1:]):
        for task_name, task in run["tasks"].items():
            reference, recipe = task_recipe(results, task_name), task_recipe(run, task_name)
            if recipe == reference:
                continue
            redone = [
                run_label(number)
                for number, other in enumerate(runs)
                if task_name in other["tasks"]
                and other["tasks"][task_name]["budget"] == task["budget"]
                and task_recipe(other, task_name) == reference
            ]
            if redone:
                changed = ", ".join(
                    f"`{key}` = {recipe.get(key)!r} (now {reference.get(key)!r})"
                    for key in sorted(set(recipe) | set(reference))
                    if recipe.get(key) != reference.get(key)
                )
                superseded[index, task_name] = (
                    f"{task_name} was trained with {changed}, and {redone[0]} repeats it at the same budget"
                )
    return superseded


def split_run(run: dict[str, Any], superseded: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's current task results and its superseded ones (`superseded` names the tasks), as two runs."""
    current = {name: task for name, task in run["tasks"].items() if name not in superseded}
    old = {name: task for name, task in run["tasks"].items() if name in superseded}
    return {**run, "tasks": current}, {**run, "tasks": old}


def training_images(results: dict[str, Any], task: dict[str, Any]) -> float:
    """Training images seen by one model of a task: the size of its budget."""
    budget = task["budget"]
    if budget["max_steps"] > 0:
        return budget["max_steps"] * results["config"]["batch_size"]
    return budget["num_train"] * budget["epochs"]


def largest_budget_tasks(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, its result with the most training images among the runs not superseded that compare Cropr with
    the unpruned model (the later run on a tie), with `run` naming that run."""
    superseded = superseded_tasks(results)
    largest: dict[str, tuple[float, dict[str, Any]]] = {}
    for number, run in enumerate([results, *results.get("further_runs", [])]):
        for task_name, task in run["tasks"].items():
            if (number - 1, task_name) in superseded or not {"none", "cropr"} <= set(task["selectors"]):
                continue
            size = training_images(run, task)
            if task_name not in largest or size >= largest[task_name][0]:
                largest[task_name] = (size, {**task, "run": run_label(number)})
    return {name: task for name, (_, task) in largest.items()}


def command_settings(command: str) -> set[str]:
    """The config keys that a recorded `scripts/reproduce.py` command sets away from their defaults, found by parsing
    it the way `main` did (so `--from-scratch` counts as setting `backbone`)."""
    parser = build_parser()
    given = asdict(config_from_args(parser.parse_args(shlex.split(command)[2:])))
    defaults = asdict(config_from_args(parser.parse_args([])))
    return {key for key, value in given.items() if value != defaults[key]}


def recipe_differences(main: dict[str, Any], run: dict[str, Any]) -> str:
    """`run`'s recipe settings that differ from `main`'s and that its command does not set (a default that changed
    between the runs), leaving out tasks, seeds and budgets, as ", and a = x (...)"."""
    main_config, run_config = recorded_config(main), recorded_config(run)
    own_settings = command_settings(run["command"])
    differences = [
        f"`{key}` = {run_config.get(key)!r} (main run: {main_config.get(key)!r})"
        for key in sorted(set(main_config) | set(run_config))
        if key not in ("tasks", "seeds", "budgets", "only_selectors", *own_settings)
        and main_config.get(key) != run_config.get(key)
    ]
    return f", and {', '.join(differences)}" if differences else ""


def budget_table(results: dict[str, Any]) -> str:
    """A markdown table of each task's data budget, frozen blocks, geometry and schedule."""
    lines = [
        "| task | train scenes | eval scenes | epochs | max steps | frozen blocks | image size | patches | "
        "tokens per block | FLOP ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task_name, task in results["tasks"].items():
        budget = task["budget"]
        lines.append(
            f"| {task_name} | {budget['num_train']} | {budget['num_eval']} | {budget['epochs']:g} | "
            f"{budget['max_steps'] if budget['max_steps'] > 0 else '-'} | {task['frozen_blocks']} of {task['depth']} | "
            f"{task['image_size']} | {task['num_patches']} "
            f"| {' > '.join(map(str, task['token_counts']))} | {task['flop_ceiling']:.2f}x |"
        )
    return "\n".join(lines)


def task_sections(results: dict[str, Any], heading: str, prefix: str = "") -> list[str]:
    """Per task: a heading, the results table and the computed findings."""
    lines = []
    for task_name, task in results["tasks"].items():
        lines += [f"{heading} {prefix}{task_name}", "", task_table(task), ""]
        lines += [f"- {finding}" for finding in task_findings(task)]
        lines += [f"- Eval throughput measured at batch {task['throughput_batch_size']}.", ""]
    return lines


RUN_KEYS = ("command", "started", "wall_seconds", "environment", "config", "model", "tasks")
"""What every results.json of `scripts/reproduce.py` holds (and what a further run carries over)."""


def attach_run(results: dict[str, Any], other: dict[str, Any]) -> None:
    """Store another run's results (e.g. a larger budget) in `results["further_runs"]`, replacing one with the same
    command; its heat-maps are not carried over."""
    run = {key: other[key] for key in RUN_KEYS}
    make_portable(run)
    run["tasks"] = {name: {**task, "heatmaps": []} for name, task in other["tasks"].items()}
    runs = [existing for existing in results.get("further_runs", []) if existing["command"] != run["command"]]
    results["further_runs"] = [*runs, run]


def render_docs(results: dict[str, Any], out_dir: str | Path, notes: str | None = None) -> Path:
    """Write `results.md` and the trade-off plots (main run, further runs, each task at its largest budget) from the
    results, with the speed-dial and detection sections of their own results files in `out_dir`; returns the
    markdown path."""
    out_dir = Path(out_dir)
    plot_tradeoff(results, out_dir / "results_tradeoff.png")
    superseded = superseded_tasks(results)
    for index, run in enumerate(results.get("further_runs", [])):
        current, old = split_run(run, {task for (number, task) in superseded if number == index})
        plot_tradeoff(current if current["tasks"] else old, out_dir / further_plot_name(index))
    largest = largest_budget_tasks(results)
    if largest:
        titles = {
            name: f"{name}\n{task['run']}, {task['budget']['num_train']} scenes x {task['budget']['epochs']:g} epoch(s)"
            for name, task in largest.items()
        }
        plot_tradeoff({"tasks": largest}, out_dir / LARGEST_BUDGET_PLOT, titles)
    beside = {}
    for name in ("results_speed_dial.json", "results_speed_dial_segmentation.json", "results_detection.json"):
        if (out_dir / name).is_file():
            beside[name] = json.loads((out_dir / name).read_text())
    path = out_dir / "results.md"
    path.write_text(
        render_markdown(
            results,
            notes if notes is not None else results.get("notes"),
            speed_dial=beside.get("results_speed_dial.json"),
            detection=beside.get("results_detection.json"),
            speed_dial_segmentation=beside.get("results_speed_dial_segmentation.json"),
        )
    )
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json written by `scripts/reproduce.py`; a `ValueError` naming the file for anything else."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the results file {path}: {error}") from None
    missing = [key for key in RUN_KEYS if key not in results] if isinstance(results, dict) else list(RUN_KEYS)
    if missing:
        raise ValueError(f"{path} is not a results.json of scripts/reproduce.py: it lacks {missing}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
DEFAULT_BUDGETS = {
    "image-classification": Budget(num_train=480, num_eval=192),
    "semantic-segmentation": Budget(num_train=288, num_eval=96),
    "multi-label-classification": Budget(num_train=288, num_eval=96),
}
"""Sized to finish all three tasks, 3 seeds, in about an hour on a 2-core CPU shared with another training job."""

QUICK_BUDGET = Budget(num_train=16, num_eval=8, max_steps=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tasks", nargs="+", default=list(SELECTORS), choices=list(SELECTORS))
    parser.add_argument(
        "--selectors",
        nargs="+",
        choices=sorted({name for names in SELECTORS.values() for name in names}),
        help="only these baselines (none and cropr always run; default: every selector of each task)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--backbone", default=str(DEFAULT_BACKBONE), help="ViT / DINOv2 checkpoint directory")
    parser.add_argument("--from-scratch", action="store_true", help="train --preset from scratch, no backbone")
    parser.add_argument("--preset", default="vit-ti8-112", choices=sorted(PRESETS), help="shape without backbone")
    parser.add_argument("--image-size", type=int, help="model input size (default: canvas size, or the preset's)")
    parser.add_argument("--canvas-size", type=int, default=112, help="side of the built-in scenes in pixels")
    parser.add_argument("--num-train", type=int, help="training scenes per task (default: per-task budget)")
    parser.add_argument("--num-eval", type=int, help="validation scenes per task (default: per-task budget)")
    parser.add_argument("--epochs", type=float, help="training epochs (default 1)")
    parser.add_argument("--max-steps", type=int, help="training steps, overrides --epochs")
    parser.add_argument("--removed-fraction", type=float, default=0.85, help="patches removed by the last module")
    parser.add_argument("--pooling", default="cls", choices=["cls", "avg"], help="pooling of the image-level heads")
    parser.add_argument("--curriculum", type=float, default=0.5, help="share of training over which R ramps up")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="lr of the heads and Cropr modules")
    parser.add_argument("--layer-decay", type=float, default=0.65)
    parser.add_argument("--router-lr-scale", type=float, default=10.0, help="lr multiplier of the Cropr modules")
    parser.add_argument("--frozen-blocks", type=int, help="frozen first blocks (default: all but 2)")
    parser.add_argument("--aux-loss-weight", type=float, default=1.0)
    parser.add_argument(
        "--no-aux-ignore-background",
        dest="aux_ignore_background",
        action="store_false",
        help="segmentation: train the Cropr auxiliary loss on the background class too",
    )
    parser.add_argument("--throughput-batch-size", type=int, default=32)
    parser.add_argument("--throughput-repeats", type=int, default=7)
    parser.add_argument("--num-heatmaps", type=int, default=3, help="validation images per heat-map figure")
    parser.add_argument("--quick", action="store_true", help="1 seed, 16 scenes, 2 steps: a smoke test of minutes")
    parser.add_argument("--output-dir", default="docs", help="where results.json, results.md and the PNGs go")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite results.md and the plots from OUTPUT_DIR/results.json (and the speed-dial, segmentation "
        "speed-dial and detection results files there)",
    )
    parser.add_argument(
        "--attach",
        action="append",
        metavar="RESULTS_JSON",
        help="with --render-only: another run's results.json to store and report as a further run",
    )
    parser.add_argument("--notes", help="markdown file stored in results.json and shown as the report's discussion")
    return parser


def config_from_args(args: argparse.Namespace) -> ReproduceConfig:
    budgets = {}
    for task in args.tasks:
        budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGETS[task]
        budgets[task] = Budget(
            num_train=args.num_train or budget.num_train,
            num_eval=args.num_eval or budget.num_eval,
            epochs=args.epochs or budget.epochs,
            max_steps=args.max_steps or budget.max_steps,
        )
    return ReproduceConfig(
        tasks=list(args.tasks),
        seeds=args.seeds[:1] if args.quick else list(args.seeds),
        only_selectors=args.selectors,
        budgets=budgets,
        backbone=None if args.from_scratch else args.backbone,
        preset=args.preset,
        image_size=args.image_size,
        canvas_size=args.canvas_size,
        removed_fraction=args.removed_fraction,
        pooling=args.pooling,
        curriculum=args.curriculum,
        batch_size=8 if args.quick else args.batch_size,
        learning_rate=args.learning_rate,
        layer_decay=args.layer_decay,
        router_lr_scale=args.router_lr_scale,
        frozen_blocks=args.frozen_blocks,
        aux_loss_weight=args.aux_loss_weight,
        aux_ignore_background=args.aux_ignore_background,
        throughput_batch_size=8 if args.quick else args.throughput_batch_size,
        throughput_repeats=1 if args.quick else args.throughput_repeats,
        num_heatmaps=1 if args.quick else args.num_heatmaps,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scripts/reproduce.py`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out_dir = Path(args.output_dir)
    notes = Path(args.notes).read_text() if args.notes else None
    if args.render_only:
        results_path = out_dir / "results.json"
        if not results_path.is_file():
            raise SystemExit(f"--render-only needs {results_path}; run without it first")
        results = load_results(results_path)
        for path in args.attach or []:
            attach_run(results, load_results(path))
        if notes is not None:
            results["notes"] = notes
        if notes is not None or args.attach:
            results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {render_docs(results, out_dir)}")
        return 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    results = run_reproduction(config_from_args(args), out_dir, ["python", "scripts/reproduce.py", *argv], notes)
    for task_name, task in results["tasks"].items():
        print(f"\n{task_name}\n{task_table(task)}")
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and the PNGs")
    return 0


__all__ = [
    "Budget",
    "ReproduceConfig",
    "SELECTORS",
    "attach_run",
    "fine_tune",
    "load_results",
    "main",
    "parameter_groups",
    "portable_path",
    "render_docs",
    "render_markdown",
    "run_reproduction",
]
