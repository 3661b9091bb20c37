"""What a user's `pipeline("image-classification")(photo)` costs, pruned vs pruning off, on single real photos.

One call is the whole user-facing path: image processing (decode-free PIL resize and normalisation), the model at
batch 1 and the post-processing (softmax, top-5). The pruned model and the same weights with pruning off run as
pipelines side by side, interleaved ([`interleaved_timings`]), and the image processor alone is timed with them, so
that its share of a call is measured rather than assumed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BaseImageProcessor, pipeline

from ..data.images import SAMPLE_PHOTOS, sample_photo
from ..models.cropr_vit.modeling_cropr_vit import CroprViTForImageClassification
from .timing import interleaved_timings


def measure_pipeline_latency(
    model: CroprViTForImageClassification,
    image_processor: BaseImageProcessor,
    photos: Sequence[Image.Image] | None = None,
    *,
    warmup: int = 1,
    repeats: int = 7,
    min_time: float = 0.0,
    clock: str = "wall",
) -> dict[str, Any]:
    """Per-photo latency of the classification pipeline with `model` (pruned) and with pruning off.

    Args:
        model: a pruned image classifier in eval mode; its pruning-off twin is `model.with_token_selector("none")`.
        image_processor: the processor both pipelines use.
        photos: the images, one pipeline call each; defaults to scikit-image's sample photos ([`SAMPLE_PHOTOS`]).
        warmup, repeats, min_time, clock: as for [`interleaved_timings`].

    Returns:
        `latency_ms` (median per photo) of `processor` (the image processor alone), `cropr` and `none` (whole
        pipeline calls); `speedup` (none over cropr), `ceiling_fraction` (speedup over the model's FLOP ceiling) and
        `processor_share` (the image processor's part of a pruned pipeline call).
    """
    if photos is None:
        photos = [sample_photo(name) for name in SAMPLE_PHOTOS]
    pipelines = {
        name: pipeline(
            "image-classification", model=variant.eval(), image_processor=image_processor, device=model.device
        )
        for name, variant in (("cropr", model), ("none", model.with_token_selector("none")))
    }

    def run_pipeline(classify) -> None:
        for photo in photos:
            classify(photo)

    steps = {
        "processor": lambda: [image_processor(images=photo, return_tensors="pt") for photo in photos],
        **{name: (lambda classify=classify: run_pipeline(classify)) for name, classify in pipelines.items()},
    }
    with torch.inference_mode():
        samples = interleaved_timings(steps, model.device, warmup, repeats, min_time, clock=clock)
    latency = {name: statistics.median(values) / len(photos) * 1e3 for name, values in samples.items()}
    speedup = latency["none"] / latency["cropr"]
    return {
        "photos": len(photos),
        "photo_sizes": [list(photo.size) for photo in photos],
        "latency_ms": latency,
        "samples_s": samples,
        "speedup": speedup,
        "flop_ceiling": model.config.flop_ceiling(),
        "ceiling_fraction": speedup / model.config.flop_ceiling(),
        "processor_share": latency["processor"] / latency["cropr"],
    }


__all__ = ["measure_pipeline_latency"]
