"""Pretrain the small plain ViT shipped in the package, the backbone that `make main` fine-tunes into a CroprViT.

The Token Cropr workflow starts from a pretrained ViT. So that the first run needs no download, the package carries
one: a ViT with 8 px patches at 112 px, pretrained here as a supervised classifier of cluttered Fashion-MNIST scenes
made **only from the training split's garments** (the built-in evaluation scenes use only the test split's). It is
saved as an ordinary transformers `ViTModel` checkpoint (fp16 safetensors, `preprocessor_config.json`, model card),
so `cropr.from_backbone(BACKBONE_DIR)` converts it as it would any Hub checkpoint.

Training is progressive: first on small canvases (a 56 px scene is a 7x7 window of the 14x14 patch grid, placed at a
random offset of the position table), then on full 112 px scenes. A small canvas costs a quarter of the tokens, so
the CPU budget buys four times the scenes; and a block that sees only a window of the grid learns what a pruned
model needs later: to classify from a subset of the tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

from cropr.data import (
    FASHION_MNIST_CLASSES,
    build_cluttered_classification,
    build_segmentation,
    load_builtin_task,
    load_fashion_mnist,
)
from cropr.data.fashion_mnist import SUBSET_SOURCE, FashionMNIST
from cropr.data.scenes import MASK_THRESHOLD
from cropr.pretrained import BACKBONE_DIR, BACKBONE_NAME
from cropr.tools.timing import available_cores, cpu_model

logger = logging.getLogger(__name__)

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # ViT's convention for models without their own statistics

PHASE_KINDS = {
    "garments": "each training garment once per epoch, grey on black at a random position; class and patch labels",
    "segments": "`scenes_per_epoch` fresh scenes of 2 to 4 tinted garments (the built-in segmentation kind); "
    "patch labels",
    "scenes": "`scenes_per_epoch` fresh cluttered scenes (the built-in classification kind); class labels",
}
"""The kinds of pretraining images and the labels they come with."""

NUM_PATCH_CLASSES = 1 + len(FASHION_MNIST_CLASSES)  # background, then the garment classes (segmentation's ids)

# Streams of the scene generator: the built-in task uses 0 (train) and 1 (validation); pretraining epochs use
# PRETRAIN_STREAM + epoch, so they never repeat the fine-tuning scenes.
PRETRAIN_STREAM = 100


@dataclass
class PretrainConfig:
    """Shape and recipe of the shipped backbone (the defaults reproduce it)."""

    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 3
    patch_size: int = 8
    image_size: int = 112
    # (kind, canvas side in pixels, epochs) per phase, in order; see `PHASE_KINDS`.
    phases: list[tuple[str, int, int]] = field(
        default_factory=lambda: [("garments", 32, 4), ("segments", 56, 4), ("scenes", 56, 6), ("scenes", 112, 12)]
    )
    scenes_per_epoch: int = 6000
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.1
    monitor_scenes: int = 300  # evaluation scenes scored after each phase, to follow the progress in the log
    eval_scenes: int = 1000
    seed: int = 0
    # "bf16": forward passes under bfloat16 autocast (weights and optimizer stay fp32): about 1.4x the images per
    # second of "fp32" on a CPU with bfloat16 matrix units (AMX, AVX512-BF16); on one without, prefer "fp32".
    precision: str = "bf16"
    # A `ViTModel` checkpoint of this shape to continue from (its blocks; the heads start afresh), or None.
    init_from: str | None = None

    def vit_config(self) -> ViTConfig:
        return ViTConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=4 * self.hidden_size,
            patch_size=self.patch_size,
            image_size=self.image_size,
        )


def pretraining_scenes(
    data: FashionMNIST, num_scenes: int, canvas_size: int, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluttered scenes of one epoch, made from the *training* split's garments only.

    Returns:
        `(images, labels)`: uint8 `(num_scenes, 3, canvas_size, canvas_size)` and int64 `(num_scenes,)`.
    """
    scenes = build_cluttered_classification(
        data.train_images, data.train_labels, num_scenes, canvas_size, seed, stream=PRETRAIN_STREAM + epoch
    )
    return scene_tensors(scenes)


def segment_scenes(
    data: FashionMNIST, num_scenes: int, canvas_size: int, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of 2 to 4 garments of one epoch with their pixel class maps, from the *training* split only.

    Returns:
        `(images, maps)`: uint8 `(num_scenes, 3, canvas_size, canvas_size)` and `(num_scenes, canvas_size,
        canvas_size)` (0 background, `class_id + 1` on garment pixels).
    """
    scenes = build_segmentation(
        data.train_images, data.train_labels, num_scenes, canvas_size, seed, stream=PRETRAIN_STREAM + epoch
    )
    images = np.stack([np.asarray(image) for image in scenes["image"]])
    maps = np.stack([np.asarray(label_map) for label_map in scenes["label"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(maps)


def scene_tensors(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """A cluttered-classification `Dataset` as uint8 `(N, 3, H, W)` images and int64 labels."""
    images = np.stack([np.asarray(image) for image in scenes["image"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(scenes["label"])


def garment_canvases(
    data: FashionMNIST, canvas_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each *training* garment once, grey on black at a random position of a small canvas: the easy first lessons.

    Returns:
        `(images, labels, maps)`: uint8 `(num_garments, 3, canvas_size, canvas_size)`, int64 `(num_garments,)`, and
        uint8 pixel class maps as in [`segment_scenes`] (garment pixels brighter than the scenes' mask threshold).
    """
    garments = torch.from_numpy(np.array(data.train_images))
    labels = torch.from_numpy(np.array(data.train_labels)).long()
    count, size = len(garments), garments.shape[-1]
    images = torch.zeros(count, 3, canvas_size, canvas_size, dtype=torch.uint8)
    maps = torch.zeros(count, canvas_size, canvas_size, dtype=torch.uint8)
    tops, lefts = torch.randint(canvas_size - size + 1, (2, count), generator=generator)
    for index, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist(), strict=True)):
        images[index, :, top : top + size, left : left + size] = garments[index]
        maps[index, top : top + size, left : left + size] = (garments[index] > MASK_THRESHOLD) * (labels[index] + 1)
    return images, labels, maps


def patch_labels(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixel class maps `(B, H, W)` -> the most frequent class of each patch, `(B, patches)` in raster order."""
    one_hot = F.one_hot(maps.long(), NUM_PATCH_CLASSES).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, patch_size).argmax(1).flatten(1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the model's input, as the saved image processor computes it (rescale, then mean/std)."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def window_hidden(model: ViTForImageClassification, pixel_values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Final hidden states (CLS, then the patches in raster order) of canvases that are windows of the patch grid.

    Args:
        model: the classifier being pretrained.
        pixel_values: `(B, 3, h, w)` with `h` and `w` multiples of the patch size, at most the model's input size.
        offsets: `(B, 2)` top and left of each window, in patches.

    A full-size canvas with zero offsets computes exactly what `model.vit(pixel_values)` computes.
    """
    vit, patch = model.vit, model.config.patch_size
    grid = model.config.image_size // patch
    embeddings = vit.embeddings
    patches = embeddings.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
    height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    rows = offsets[:, :1, None] + torch.arange(height).view(1, height, 1)
    cols = offsets[:, 1:, None] + torch.arange(width).view(1, 1, width)
    positions = (rows * grid + cols).flatten(1)  # (B, h*w) indices into the patch grid
    table = embeddings.position_embeddings
    patches = patches + table[0, 1:][positions]
    cls = (embeddings.cls_token + table[:, :1]).expand(len(pixel_values), -1, -1)
    hidden = embeddings.dropout(torch.cat([cls, patches], dim=1))
    for layer in vit.layers:
        hidden = layer(hidden, None)
    return vit.layernorm(hidden)


@torch.inference_mode()
def accuracy(model: ViTForImageClassification, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of the full-size model on uint8 scenes."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(pixel_values=normalize(images[start : start + batch_size])).logits
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def learning_rate_at(step: int, total_steps: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.5 * config.learning_rate * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def epoch_data(
    kind: str, data: FashionMNIST, canvas: int, config: PretrainConfig, epoch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One epoch of a phase: `(images, class labels or None, pixel class maps or None)`."""
    if kind == "garments":
        return garment_canvases(data, canvas, generator)
    if kind == "segments":
        images, maps = segment_scenes(data, config.scenes_per_epoch, canvas, config.seed, epoch)
        return images, None, maps
    images, labels = pretraining_scenes(data, config.scenes_per_epoch, canvas, config.seed, epoch)
    return images, labels, None


def pretrain(
    config: PretrainConfig, data: FashionMNIST, first_epoch: int = 0
) -> tuple[ViTForImageClassification, list[dict]]:
    """Train the classifier through the phases of `config`; returns it and one log record per epoch.

    `first_epoch` numbers the epochs of a run that continues an earlier one (`config.init_from`) after the earlier
    run's, so that its scenes are fresh ones too.

    Images with class labels train the CLS token through the classifier; images with pixel class maps also train
    every patch token, through a linear patch head, to tell the class of the garment it shows (or background): a
    label per token teaches a ViT from scratch far faster than one per image, and it is what Cropr's scorers later
    look for. The patch head is not saved.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    vit_config = config.vit_config()
    vit_config.num_labels = len(FASHION_MNIST_CLASSES)
    model = ViTForImageClassification(vit_config)
    if config.init_from is not None:
        earlier = ViTModel.from_pretrained(config.init_from, add_pooling_layer=False, local_files_only=True)
        model.vit.load_state_dict(earlier.float().state_dict())
    patch_head = torch.nn.Linear(config.hidden_size, NUM_PATCH_CLASSES)
    parameters = [*model.named_parameters(), *(("patch_head." + n, p) for n, p in patch_head.named_parameters())]
    decay = [p for n, p in parameters if p.ndim >= 2 and "position_embeddings" not in n]
    no_decay = [p for n, p in parameters if p.ndim < 2 or "position_embeddings" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    epoch_sizes = {"garments": len(data.train_images), "segments": config.scenes_per_epoch}
    total_steps = sum(
        math.ceil(epoch_sizes.get(kind, config.scenes_per_epoch) / config.batch_size) * epochs
        for kind, _, epochs in config.phases
    )
    grid = config.image_size // config.patch_size
    monitor = load_builtin_task(
        "cluttered-classification", num_train=1, num_eval=config.monitor_scenes, seed=0, source=SUBSET_SOURCE
    )["validation"]
    monitor_images, monitor_labels = scene_tensors(monitor)
    step, epoch, records, start = 0, first_epoch, [], time.perf_counter()
    for phase, (kind, canvas, epochs) in enumerate(config.phases):
        if kind not in PHASE_KINDS:
            raise ValueError(f"unknown phase kind {kind!r}; choose from {sorted(PHASE_KINDS)}")
        span = grid - canvas // config.patch_size + 1  # possible window offsets along each side
        for _ in range(epochs):
            images, labels, maps = epoch_data(kind, data, canvas, config, epoch, generator)
            order = torch.randperm(len(images), generator=generator)
            model.train()
            totals = dict.fromkeys(("loss", "correct", "patches_correct", "patches", "seen"), 0.0)
            epoch_start = time.perf_counter()
            for begin in range(0, len(order), config.batch_size):
                index = order[begin : begin + config.batch_size]
                batch = normalize(images[index])
                flip = torch.rand(len(index), generator=generator) < 0.5
                batch[flip] = batch[flip].flip(-1)
                offsets = torch.randint(span, (len(index), 2), generator=generator)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                    hidden = window_hidden(model, batch, offsets)
                hidden = hidden.float()
                loss = torch.zeros(())
                if labels is not None:
                    logits = model.classifier(hidden[:, 0])
                    loss = loss + F.cross_entropy(logits, labels[index], label_smoothing=config.label_smoothing)
                    totals["correct"] += int((logits.argmax(-1) == labels[index]).sum())
                if maps is not None:
                    batch_maps = maps[index]
                    batch_maps[flip] = batch_maps[flip].flip(-1)
                    targets = patch_labels(batch_maps, config.patch_size)
                    patch_logits = patch_head(hidden[:, 1:])
                    loss = loss + F.cross_entropy(patch_logits.flatten(0, 1), targets.flatten())
                    garment = targets > 0
                    totals["patches_correct"] += int((patch_logits.argmax(-1) == targets)[garment].sum())
                    totals["patches"] += int(garment.sum())
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, total_steps, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in parameters], config.max_grad_norm)
                optimizer.step()
                step += 1
                totals["loss"] += loss.item() * len(index)
                totals["seen"] += len(index)
            record = {
                "epoch": epoch + 1,
                "kind": kind,
                "canvas": canvas,
                "loss": round(totals["loss"] / totals["seen"], 4),
                "images_per_second": round(totals["seen"] / (time.perf_counter() - epoch_start), 1),
                "elapsed_minutes": round((time.perf_counter() - start) / 60, 2),
            }
            if labels is not None:
                record["train_accuracy"] = round(totals["correct"] / totals["seen"], 4)
            if maps is not None:
                record["garment_patch_accuracy"] = round(totals["patches_correct"] / max(totals["patches"], 1), 4)
            epoch += 1
            if epoch - first_epoch == sum(epochs for _, _, epochs in config.phases[: phase + 1]):
                record[f"accuracy_on_{config.monitor_scenes}_eval_scenes"] = round(
                    accuracy(model, monitor_images, monitor_labels, batch_size=64), 4
                )
            records.append(record)
            logger.info("epoch %s", json.dumps(record))
    return model, records


def save_backbone(model: ViTForImageClassification, config: PretrainConfig, output_dir: Path) -> None:
    """Write the backbone alone (no head, no pooler) as an fp16 `ViTModel` checkpoint with its image processor."""
    backbone = ViTModel(config.vit_config(), add_pooling_layer=False)
    backbone.load_state_dict(model.vit.state_dict())
    backbone.to(torch.float16).save_pretrained(output_dir)
    size = {"height": config.image_size, "width": config.image_size}
    ViTImageProcessorPil(size=size, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD)).save_pretrained(output_dir)


def machine_description() -> str:
    """CPU model and core count, as the model card states them."""
    threads = torch.get_num_threads()
    return f"{available_cores()}-core CPU ({cpu_model()}); torch {torch.__version__}, {threads} thread(s)"


def describe_phases(phases: Sequence[Sequence]) -> str:
    """`[("scenes", 112, 2)]` -> "2 epochs of scenes on 112 px canvases" (phases joined by ", then ")."""
    return ", then ".join(
        f"{epochs} epoch{'s' if epochs > 1 else ''} of {'lone garments' if kind == 'garments' else kind} on "
        f"{canvas} px canvases"
        for kind, canvas, epochs in phases
    )


def stages(results: dict) -> list[dict]:
    """The runs that made a checkpoint, first to last: the earlier ones it continued (`started_from`), then itself."""
    earlier = results.get("started_from")
    return [*(stages(earlier) if earlier else []), results]


def model_card(config: PretrainConfig, results: dict) -> str:
    """The README.md of the checkpoint, from the measured numbers in `results`."""
    grid = config.image_size // config.patch_size
    params = results["parameters"]
    runs = stages(results)
    progress = ", ".join(
        f"{100 * record[key]:.1f}%"
        for run in runs
        for record in run["records"]
        for key in [f"accuracy_on_{run['config']['monitor_scenes']}_eval_scenes"]
        if key in record
    )
    recipe = "; then, continuing from that checkpoint, ".join(
        f"{describe_phases(run['config']['phases'])} (lr {run['config']['learning_rate']}, "
        f"{run['config']['warmup_steps']} warm-up steps, {run['config']['scenes_per_epoch']} scenes or segments per "
        "epoch)"
        for run in runs
    )
    commands = " then ".join(f"`{run['command']}`" for run in runs)
    wall_minutes = sum(run["wall_minutes"] for run in runs)
    load = (
        " (load average {:.1f}, {:.1f}, {:.1f} over the last 1, 5, 15 minutes of the last run)".format(
            *results["load_average"]
        )
        if results.get("load_average")
        else ""
    )
    precision = (
        "; forward passes under bfloat16 autocast (weights and optimizer state in fp32)"
        if config.precision == "bf16"
        else ""
    )
    wall_parts = " + ".join(f"{run['wall_minutes']:.1f}" for run in runs)
    return f"""---
license: mit
library_name: transformers
pipeline_tag: image-feature-extraction
tags: [vit, cropr, fashion-mnist]
datasets: [zalando-datasets/fashion_mnist]
---

# {BACKBONE_NAME}: a small plain ViT pretrained on cluttered Fashion-MNIST scenes

A transformers `ViTModel` ({params / 1e6:.2f} M parameters, fp16 safetensors) shipped inside the `cropr` package,
so that the first run fine-tunes a CroprViT from pretrained weights without downloading anything:

```python
import cropr

model, processor = cropr.from_backbone(cropr.pretrained.BACKBONE_DIR, "image-classification", num_labels=10)
```

## Shape, and why
{config.image_size} px input, {config.patch_size} px patches ({grid}x{grid} = {grid * grid} patches + CLS, the token
count of a ViT-B/16 at 224 px, so Cropr has as many tokens to prune as in the paper's setting), width
{config.hidden_size}, {config.num_hidden_layers} blocks, {config.num_attention_heads} heads of 64, MLP
{4 * config.hidden_size}: ViT-Tiny's width at a depth that fine-tunes twice (pruned and unpruned) within the first
run's few minutes on a 2-core CPU, and leaves {config.num_hidden_layers - 2} blocks for Cropr modules before Last Layer
Fusion. Garments are 28 to 56 px on the 112 px canvas, 3.5 to 7 patches across.

## Data
Only the **training split** of the Fashion-MNIST subset shipped in the package ({results["train_garments"]} garments;
Fashion-MNIST: Xiao, Rasul and Vollgraf 2017, MIT license, Zalando SE), in three kinds of images:

- *lone garments*: each training garment once per epoch, grey on black at a random position of a small canvas;
  labelled with its class, and each patch with the class of the garment it shows or background;
- *segments*: fresh scenes each epoch of 2 to 4 tinted garments on faint noise (the built-in
  segmentation kind, `cropr.data.build_segmentation`); each patch labelled with its most frequent pixel class;
- *scenes*: fresh scenes each epoch of the built-in cluttered-classification kind
  (`cropr.data.build_cluttered_classification`: one tinted garment at a random scale and position among fragments
  of garments of other classes, on faint noise); labelled with the garment's class.

Random horizontal flips. No test-split garment was seen: the built-in evaluation scenes are made of test-split
garments only.

## Training
Supervised: the CLS token through a linear classifier (10 classes) where an image has a class, every patch token
through a linear patch head (background + 10 classes) where it has patch labels; a label per token teaches a ViT
trained from scratch far faster than one per image. Both heads are dropped from the checkpoint. AdamW (weight decay
{config.weight_decay}, batch {config.batch_size}, linear warm-up, cosine decay to 0, gradient norm clipped at
{config.max_grad_norm}), label smoothing {config.label_smoothing} for the classifier{precision}. In order: {recipe}.
A canvas smaller than {config.image_size} px is a window of the patch grid at a random offset of the position table:
a 56 px scene costs a quarter of the tokens of a 112 px one, so the CPU buys four times the scenes, and the blocks
practise classifying from part of the tokens.

- Command{"s" if len(runs) > 1 else ""}: {commands}
- Machine: {results["machine"]}{load}
- Wall time: {wall_minutes:.1f} minutes{f" ({wall_parts})" if len(runs) > 1 else ""}
- Per epoch: see `pretraining_log.json`

## Measured accuracy
Top-1 of the pretraining classifier (backbone + its linear head) on the {config.eval_scenes} built-in evaluation
scenes (`cropr.data.load_builtin_task("cluttered-classification", source="subset")`, validation split, seed 0, made of
test-split garments): **{100 * results["eval_accuracy"]:.1f}%**. Training-scene accuracy in the last epoch:
{100 * results["records"][-1]["train_accuracy"]:.1f}%. On the first {config.monitor_scenes} of those scenes after each
phase: {progress}.

The head is not part of the checkpoint: `make main` fine-tunes a fresh one, with Cropr modules, from this backbone.
"""


def run(config: PretrainConfig, output_dir: Path, command: str) -> dict:
    """Pretrain, measure, save the checkpoint with its card and log; returns the measured numbers."""
    start = time.perf_counter()
    data = load_fashion_mnist(SUBSET_SOURCE)
    earlier_log = Path(config.init_from or "") / "pretraining_log.json"
    started_from = json.loads(earlier_log.read_text()) if config.init_from and earlier_log.is_file() else None
    first_epoch = sum(len(run["records"]) for run in stages(started_from)) if started_from else 0
    # Subnormal floats, which gradients and the optimizer's moments drift into over a long run, cost an x86 CPU many
    # cycles per operation (without the flush, 112 px epochs ran at 22-28 images/s, a fresh model at 40); flushed, a
    # late epoch runs as fast as an early one. Switched back off (torch's default) afterwards.
    torch.set_flush_denormal(True)
    try:
        model, records = pretrain(config, data, first_epoch)
    finally:
        torch.set_flush_denormal(False)
    wall_minutes = (time.perf_counter() - start) / 60
    evaluation = load_builtin_task(
        "cluttered-classification", num_train=1, num_eval=config.eval_scenes, seed=0, source=SUBSET_SOURCE
    )["validation"]
    eval_accuracy = accuracy(model, *scene_tensors(evaluation), batch_size=64)
    logger.info("eval accuracy %.4f after %.1f minutes", eval_accuracy, wall_minutes)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_backbone(model, config, output_dir)
    results = {
        "config": asdict(config),
        "command": command,
        "records": records,
        "eval_accuracy": eval_accuracy,
        "wall_minutes": wall_minutes,
        "machine": machine_description(),
        "load_average": list(os.getloadavg()),
        "train_garments": len(data.train_images),
        "parameters": sum(p.numel() for p in model.vit.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if started_from:
        results["started_from"] = started_from
    (output_dir / "pretraining_log.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "README.md").write_text(model_card(config, results))
    return results


def parse_phases(spec: str, patch_size: int = 8, image_size: int = 112) -> list[tuple[str, int, int]]:
    """`"garments32x16,scenes112x1"` -> `[("garments", 32, 16), ("scenes", 112, 1)]`, checking each phase."""
    pattern = re.compile(rf"({'|'.join(PHASE_KINDS)})(\d+)x(\d+)")
    phases = []
    for item in spec.split(","):
        match = pattern.fullmatch(item.strip())
        if match is None:
            raise ValueError(
                f"--phases: {item!r} is not KINDSIZExEPOCHS with KIND one of {', '.join(PHASE_KINDS)} (garments32x4)"
            )
        kind, canvas, epochs = match[1], int(match[2]), int(match[3])
        if canvas % patch_size or not 32 <= canvas <= image_size:
            raise ValueError(f"--phases: canvas {canvas} must be a multiple of {patch_size} from 32 to {image_size}")
        phases.append((kind, canvas, epochs))
    return phases


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(BACKBONE_DIR), help="where to write the checkpoint")
    parser.add_argument(
        "--phases",
        default=",".join(f"{kind}{canvas}x{epochs}" for kind, canvas, epochs in PretrainConfig().phases),
        help=f"kind, canvas size and epochs of each phase, in order (kinds: {', '.join(PHASE_KINDS)})",
    )
    parser.add_argument("--scenes-per-epoch", type=int, default=PretrainConfig.scenes_per_epoch)
    parser.add_argument("--eval-scenes", type=int, default=PretrainConfig.eval_scenes)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--learning-rate", type=float, default=PretrainConfig.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=PretrainConfig.warmup_steps)
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=PretrainConfig.precision,
        help="bf16: forward passes under bfloat16 autocast, faster on CPUs with bfloat16 units (weights stay fp32)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="continue from this ViTModel checkpoint of the same shape (e.g. the shipped one); its pretraining log, "
        "if any, is kept in the new one's, and the model card describes both runs",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point of `scripts/pretrain_backbone.py`."""
    args = parse_args(argv)
    try:
        phases = parse_phases(args.phases)
    except ValueError as error:
        sys.exit(f"pretrain_backbone.py: error: {error}")
    config = PretrainConfig(
        phases=phases,
        scenes_per_epoch=args.scenes_per_epoch,
        eval_scenes=args.eval_scenes,
        seed=args.seed,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        precision=args.precision,
        init_from=args.init_from,
    )
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    command = shlex.join(["python", "scripts/pretrain_backbone.py", *(sys.argv[1:] if argv is None else argv)])
    return run(config, Path(args.output_dir), command)


__all__ = ["BACKBONE_DIR", "PretrainConfig", "main", "pretrain", "pretraining_scenes", "save_backbone", "window_hidden"]
