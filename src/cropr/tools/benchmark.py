"""Throughput, latency, FLOPs and training-step benchmark of CroprViT against transformers' own ViT / DINOv2 /
DINOv3 / SigLIP.

Every variant is measured in one process, interleaved: after a warm-up, each repeat runs every variant once (in a
rotated order), and the median over repeats is reported. Variants:

- `hf`: transformers' `ViTModel` (`add_pooling_layer=False`), `Dinov2Model`, `DINOv3ViTModel` or `SiglipVisionModel`
  of the same shape, SDPA attention;
- `none`: `CroprViTModel` without pruning, holding the same weights as `hf` (its output is checked to be equal);
- `random`: the same weights with the random selector and the schedule of the preset;
- `cropr`: the same weights with Cropr routers (eval, stripped with `strip_training_modules()`);
- `ideal`: the same blocks on the same token counts as `cropr` with routing that costs nothing ([`IdealRouting`]).

Derived numbers per dtype and batch size: speedup of `cropr` (and `random`) over `none`, its ratio to the analytic
FLOP ceiling, the router overhead `time(cropr) / time(random) - 1` and the `none` / `hf` throughput ratio. A training
step (forward + backward + AdamW, aux heads active) of `none`, `random` and `cropr` shows what pruning saves and
the auxiliary heads cost in training. `ideal` splits the gap between the measured speedup and the FLOP ceiling: its
speedup over `none` is what the blocks allow on this machine (short sequences use the hardware less well than their
FLOP count says), and `time(cropr) / time(ideal) - 1` is what routing costs. `--block-scaling` says why: it times the
blocks at each token count of the schedule and splits their time into a fixed cost per call and a cost per
multiply-add ([`measure_block_scaling`]).

Given a checkpoint (`cropr benchmark CHECKPOINT --pruning-rates 0,4,8,16`), it times that model instead, once per
pruning rate (`set_pruning_rate`, the same weights), interleaved in the same way.

Run `python scripts/benchmark.py --help`; the numbers of the project's README come from
`python scripts/benchmark.py --preset vit-b16 --output results.json` on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTImageProcessorPil
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..conversion import convert_backbone_state_dict, load_backbone_weights
from ..data.images import SAMPLE_PHOTOS, sample_photo
from ..models.cropr_vit.configuration_cropr_vit import CroprViTConfig
from ..models.cropr_vit.modeling_cropr_vit import CroprViTForImageClassification, CroprViTModel
from ..presets import PRESETS as MODEL_PRESETS
from .argtypes import bounded_int, int_list, non_negative_float, output_file, parse_schedule
from .block_scaling import format_block_scaling, measure_block_scaling
from .pipeline_latency import measure_pipeline_latency
from .timing import CLOCKS, available_cores, interleaved_timings, machine_environment

INFERENCE_VARIANTS = ("hf", "none", "random", "cropr", "ideal")
PRUNED_VARIANTS = ("random", "cropr", "ideal")
TRAINING_VARIANTS = ("none", "random", "cropr")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Targets of the "Performance" issue, checked at every dtype and batch size.
TARGET_CEILING_FRACTION = 0.97
TARGET_ROUTER_OVERHEAD = 0.02
TARGET_NONE_VS_HF = 0.97
# Largest |none - hf| on the fp32 outputs, relative to the largest |hf| value, accepted as "the same model".
SANITY_RTOL = 1e-4


@dataclass(frozen=True)
class Preset:
    """A benchmark model: the transformers family to compare with and the CroprViT config (pruning schedule)."""

    family: str  # "vit", "dinov2", "dinov3_vit" or "siglip"
    config: dict[str, Any]
    description: str
    name: str  # the model alone, for runs that change its image size or schedule


PRESETS: dict[str, Preset] = {
    "vit-b16": Preset(
        family="vit",
        config={**MODEL_PRESETS["vit-b16"], "num_labels": 1000},
        description="ViT-B/16 at 224 px, R=16 after every block + LLF (197 -> 180 -> ... -> 36 tokens)",
        name="ViT-B/16",
    ),
    "dinov2-s14": Preset(
        family="dinov2",
        config={**MODEL_PRESETS["dinov2-s14"], "num_labels": 1000},
        description="DINOv2-S/14 at 224 px (256 patches), layer scale, R=20 after every block + LLF "
        "(257 -> 236 -> ... -> 56 tokens, the share ViT-B/16 R=16 keeps)",
        name="DINOv2-S/14",
    ),
    "dinov3-s16": Preset(
        family="dinov3_vit",
        config={**MODEL_PRESETS["dinov3-s16"], "num_labels": 1000},
        description="DINOv3-S/16 at 224 px (196 patches + CLS + 4 registers), rotary position embeddings, layer scale, "
        "R=16 after every block + LLF (201 -> 184 -> ... -> 40 tokens)",
        name="DINOv3-S/16",
    ),
    "siglip-b16": Preset(
        family="siglip",
        config={**MODEL_PRESETS["siglip-b16"], "num_labels": 1000},
        description="SigLIP-B/16-shaped tower at 224 px: no CLS token, attention-pooling (MAP) head, R=16 after every "
        "block + LLF (196 -> 180 -> ... -> 36 tokens)",
        name="SigLIP-B/16-shaped tower",
    ),
    "vit-l16": Preset(
        family="vit",
        config={**MODEL_PRESETS["vit-l16"], "num_labels": 1000},
        description="ViT-L/16 at 224 px, R=8 after every block + LLF (197 -> 188 -> ... -> 20 tokens), the paper's "
        "ImageNet model",
        name="ViT-L/16",
    ),
    "tiny": Preset(
        family="vit",
        config={**MODEL_PRESETS["tiny"], "num_labels": 5},
        description="4-block, 32-wide ViT on 32x32 images with 8x8 patches (tests)",
        name="4-block, 32-wide ViT",
    ),
}


@dataclass
class BenchmarkOptions:
    """What to measure; `main` fills it from the command line."""

    preset: str = "vit-b16"
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pruning_rates: list[int] = field(default_factory=list)
    saved_schedule: bool = False
    device: str = "cpu"
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    variants: list[str] = field(default_factory=lambda: list(INFERENCE_VARIANTS))
    warmup: int = 3
    repeats: int = 7
    min_time: float = 1.0
    threads: int | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    train_batch_size: int | None = 8
    train_repeats: int = 5
    count_flops: bool = True
    seed: int = 0
    clock: str = "wall"
    pipeline: bool = False
    block_scaling: bool = False
    quiet: bool = False
    output: str | None = None
    markdown: str | None = None


def log(message: str, quiet: bool = False) -> None:
    """Progress line on stderr (the table and JSON go to stdout and the output file)."""
    if not quiet:
        print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------
def build_config(preset: str, overrides: dict[str, Any] | None = None, **fields: Any) -> CroprViTConfig:
    """The CroprViT config of a preset, with `overrides` (e.g. from `--set`) and `fields` applied in that order."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    kwargs = {**PRESETS[preset].config, **(overrides or {}), **fields}
    return CroprViTConfig(attn_implementation="sdpa", **kwargs)


def build_hf_model(family: str, config: CroprViTConfig) -> nn.Module:
    """transformers' `ViTModel` / `Dinov2Model` / `DINOv3ViTModel` / `SiglipVisionModel` with the backbone shape of
    `config` and SDPA attention."""
    if config.use_cls_token == (family == "siglip"):
        fix = "has no CLS token: set `use_cls_token=False`" if family == "siglip" else "has a CLS token: keep it"
        raise ValueError(f"transformers' {family} baseline {fix}.")
    if config.image_size_hw[0] != config.image_size_hw[1] or config.patch_size_hw[0] != config.patch_size_hw[1]:
        raise ValueError("The transformers baselines need square images and patches.")
    common = dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size_hw[0],
        patch_size=config.patch_size_hw[0],
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        attn_implementation="sdpa",
    )
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        if config.layerscale_value is not None:
            raise ValueError("transformers' ViT has no layer scale: use a DINOv2 preset for `layerscale_value`.")
        return ViTModel(ViTConfig(intermediate_size=config.intermediate_size, **common), add_pooling_layer=False)
    if family == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        if config.intermediate_size % config.hidden_size:
            raise ValueError("transformers' DINOv2 sets the MLP width as an integer multiple of `hidden_size`.")
        return Dinov2Model(
            Dinov2Config(
                mlp_ratio=config.intermediate_size // config.hidden_size,
                layerscale_value=1.0 if config.layerscale_value is None else config.layerscale_value,
                drop_path_rate=0.0,
                use_swiglu_ffn=False,
                **common,
            )
        )
    if family == "dinov3_vit":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        return DINOv3ViTModel(
            DINOv3ViTConfig(
                intermediate_size=config.intermediate_size,
                layerscale_value=1.0 if config.layerscale_value is None else config.layerscale_value,
                num_register_tokens=config.num_register_tokens,
                rope_theta=config.rope_theta,
                use_gated_mlp=config.use_gated_mlp,
                **{name: value for name, value in common.items() if "dropout" not in name and name != "qkv_bias"},
            )
        )
    if family == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel(
            SiglipVisionConfig(
                intermediate_size=config.intermediate_size,
                vision_use_head=config.pooling == "map",
                **{name: common[name] for name in common if name not in ("hidden_dropout_prob", "qkv_bias")},
            )
        )
    raise ValueError(f"Unknown model family {family!r}: 'vit', 'dinov2', 'dinov3_vit' or 'siglip'.")


class IdealRouting(nn.Module):
    """The blocks of `model` (an unpruned `CroprViTModel`) on the token counts of `schedule`, routed for free.

    After each module of the schedule it keeps the first K tokens (a slice: no scores, no gather), and Last Layer
    Fusion completes them with the embeddings of the other tokens (one concatenation, no reordering): the same blocks
    on the same numbers of tokens as the pruned model, without any routing operation. A timing reference only; its
    outputs mean nothing.
    """

    def __init__(self, model: CroprViTModel, schedule: CroprViTConfig):
        super().__init__()
        self.model = model
        self.keep_counts = schedule.patch_keep_counts()
        self.pruning_blocks = frozenset(schedule.pruning_blocks)
        self.fuse = schedule.last_layer_fusion and bool(self.pruning_blocks)

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        model = self.model
        hidden_states = embedded = model.embeddings(pixel_values, False)
        # Rotary position embeddings rotate every token in every block: the slices keep the first positions' angles.
        rotary = all_rotary = model._start_routing(pixel_values, hidden_states, False).rotary
        num_prefix, last_block = model.config.num_prefix_tokens, len(model.layers) - 1
        for block, layer in enumerate(model.layers):
            if block == last_block and self.fuse:
                # The embeddings of the tokens routed away stand in for them; concatenated (not replacing the kept
                # tokens) so that the earlier blocks' work reaches the output, or a compiler would drop it.
                hidden_states = torch.cat([hidden_states, embedded[:, hidden_states.shape[1] :]], dim=1)
                rotary = all_rotary
            hidden_states, _ = layer(hidden_states, rotary=rotary)
            if block in self.pruning_blocks:
                kept = num_prefix + self.keep_counts[block]
                hidden_states = hidden_states[:, :kept]
                rotary = None if rotary is None else tuple(table[:, :kept] for table in rotary)
        sequence_output = model.layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=model._pool(sequence_output))


def selector_of(variant: str) -> str:
    """The `token_selector` of a variant's CroprViT config (`hf` and `ideal` run unpruned CroprViT blocks)."""
    return "none" if variant in ("hf", "ideal") else variant


@dataclass
class InferenceModels:
    """The eval models of one benchmark, sharing backbone weights."""

    config: CroprViTConfig
    models: dict[str, nn.Module]
    configs: dict[str, CroprViTConfig]
    backbone_state: dict[str, torch.Tensor]


def build_inference_models(options: BenchmarkOptions) -> InferenceModels:
    """`hf`, `none`, `random`, `cropr` and `ideal` (those in `options.variants`) in eval mode, same backbone weights."""
    preset = PRESETS[options.preset]
    config = build_config(options.preset, options.overrides)
    torch.manual_seed(options.seed)
    hf_model = build_hf_model(preset.family, config).eval()
    backbone_state = convert_backbone_state_dict(hf_model.state_dict(), preset.family)
    models: dict[str, nn.Module] = {}
    configs: dict[str, CroprViTConfig] = {}
    for variant in options.variants:
        if variant == "hf":
            models[variant] = hf_model
            configs[variant] = build_config(options.preset, options.overrides, token_selector="none")
            continue
        variant_config = build_config(options.preset, options.overrides, token_selector=selector_of(variant))
        model = CroprViTModel(variant_config)
        load_backbone_weights(model, backbone_state, f"transformers' {preset.family} baseline")
        model.eval()
        if variant == "cropr":
            model.strip_training_modules()
        if variant == "ideal":
            model, variant_config = IdealRouting(model, config), config
        models[variant] = model
        configs[variant] = variant_config
    return InferenceModels(config=config, models=models, configs=configs, backbone_state=backbone_state)


def check_outputs(
    models: dict[str, nn.Module], config: CroprViTConfig, pixel_values: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """fp32 sanity check: `none` equals `hf` (same weights) and every variant gives the expected output shape."""
    checks: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        outputs = {name: model(pixel_values=pixel_values).last_hidden_state for name, model in models.items()}
    batch_size = pixel_values.shape[0]
    full_shape = (batch_size, config.num_patches + config.num_prefix_tokens, config.hidden_size)
    for name, output in outputs.items():
        pruned = name in PRUNED_VARIANTS
        if pruned and not config.last_layer_fusion:
            kept = config.patch_keep_counts()[config.pruning_blocks[-1]] + config.num_prefix_tokens
            expected = (batch_size, kept, config.hidden_size)
        else:
            expected = full_shape
        if tuple(output.shape) != expected:
            raise RuntimeError(f"Variant {name!r} returned shape {tuple(output.shape)}, expected {expected}.")
        checks[name] = {"shape": list(output.shape)}
    if "hf" in outputs and "none" in outputs:
        reference = outputs["hf"]
        max_abs_diff = (outputs["none"] - reference).abs().max().item()
        scale = reference.abs().max().item()
        if max_abs_diff > SANITY_RTOL * max(scale, 1.0):
            raise RuntimeError(
                f"CroprViT (selector none) differs from transformers' model with the same weights by "
                f"{max_abs_diff:.3g} "
                f"(output scale {scale:.3g}): the weight copy or the block structure does not match."
            )
        checks["none"]["max_abs_diff_vs_hf"] = max_abs_diff
    return checks


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------------
def counted_macs(model: nn.Module, pixel_values: torch.Tensor) -> int:
    """Multiply-adds per image counted by `FlopCounterMode` (FLOPs / 2).

    SDPA runs on its math backend while counting, so that attention decomposes into counted matmuls (the fused CPU
    kernel has no FLOP formula). Matrix-vector products (the Cropr router's n x D scores) are not counted by torch.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        model(pixel_values=pixel_values)
    return counter.get_total_flops() // (2 * pixel_values.shape[0])


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------
def autocast_context(device: torch.device, dtype_name: str) -> contextlib.AbstractContextManager:
    amp_dtype = DTYPES[dtype_name]
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def timing_summary(samples: list[float], batch_size: int) -> dict[str, Any]:
    """Median, extremes, throughput and latency of one variant's timed samples (seconds per call of `batch_size`)."""
    median = statistics.median(samples)
    return {
        "median_s": median,
        "min_s": min(samples),
        "max_s": max(samples),
        "throughput": batch_size / median,
        "best_throughput": batch_size / min(samples),
        "latency_ms": median * 1e3,
        "samples_s": samples,
    }


def derived_metrics(results: dict[str, dict[str, Any]], flop_ceiling: float) -> dict[str, Any]:
    """Speedups, ceiling fraction, router overhead and the none/hf ratio from one dtype/batch's variant results.

    The headline numbers use median throughputs; `best` repeats them from each variant's fastest sample, which is
    less disturbed by other processes on a shared machine.
    """
    metrics: dict[str, Any] = {"flop_ceiling": flop_ceiling}
    metrics.update(_ratios(results, "throughput", flop_ceiling))
    metrics["best"] = _ratios(results, "best_throughput", flop_ceiling)
    targets: dict[str, bool] = {}
    if "ceiling_fraction" in metrics:
        targets["speedup >= 0.97 x ceiling"] = metrics["ceiling_fraction"] >= TARGET_CEILING_FRACTION
    if "router_overhead" in metrics:
        targets["router overhead <= 2%"] = metrics["router_overhead"] <= TARGET_ROUTER_OVERHEAD
    if "none_vs_hf" in metrics:
        targets["none within 3% of hf"] = metrics["none_vs_hf"] >= TARGET_NONE_VS_HF
    metrics["targets"] = targets
    return metrics


def _ratios(results: dict[str, dict[str, Any]], key: str, flop_ceiling: float) -> dict[str, float]:
    none, hf, random, cropr, ideal = (
        results[name][key] if name in results else None for name in ("none", "hf", "random", "cropr", "ideal")
    )
    ratios = {}
    if none and cropr:
        ratios["speedup_cropr"] = cropr / none
        ratios["ceiling_fraction"] = ratios["speedup_cropr"] / flop_ceiling
    if none and random:
        ratios["speedup_random"] = random / none
    if random and cropr:
        ratios["router_overhead"] = random / cropr - 1.0
    if none and hf:
        ratios["none_vs_hf"] = none / hf
    if none and ideal:
        ratios["speedup_ideal"] = ideal / none
        ratios["ideal_ceiling_fraction"] = ratios["speedup_ideal"] / flop_ceiling
    if ideal and cropr:
        ratios["routing_cost"] = ideal / cropr - 1.0
    return ratios


def maybe_compile(model: nn.Module, options: BenchmarkOptions) -> nn.Module:
    if not options.compile:
        return model
    # Every variant at every batch size and dtype is one more compiled entry of the same `forward` code object; past
    # dynamo's default limit (8) the rest would silently run eagerly and be timed as if compiled.
    entries = len(options.variants) * len(options.batch_sizes) * len(options.dtypes)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * entries)
    return torch.compile(model, backend=options.compile_backend, mode=options.compile_mode, dynamic=False)


def benchmark_inference(
    inference: InferenceModels, options: BenchmarkOptions, device: torch.device
) -> list[dict[str, Any]]:
    """One entry per (dtype, batch size) with every variant's timing and the derived metrics."""
    config = inference.config
    ceiling = inference.configs.get("cropr", inference.configs.get("random", config)).flop_ceiling()
    runnable = {name: maybe_compile(model, options) for name, model in inference.models.items()}
    height, width = config.image_size_hw
    entries = []
    for dtype_name in options.dtypes:
        for batch_size in options.batch_sizes:

            def progress(message: str, dtype_name=dtype_name, batch_size=batch_size) -> None:
                log(f"inference {dtype_name} batch {batch_size}: {message}", options.quiet)

            generator = torch.Generator().manual_seed(options.seed + batch_size)
            pixel_values = torch.randn(batch_size, config.num_channels, height, width, generator=generator).to(device)
            steps = {name: _inference_step(model, pixel_values, device, dtype_name) for name, model in runnable.items()}
            samples = interleaved_timings(
                steps, device, options.warmup, options.repeats, options.min_time, progress, options.clock
            )
            results = {name: timing_summary(samples[name], batch_size) for name in steps}
            entries.append(
                {
                    "dtype": dtype_name,
                    "batch_size": batch_size,
                    "variants": results,
                    "metrics": derived_metrics(results, ceiling),
                }
            )
    return entries


def _inference_step(
    model: nn.Module, pixel_values: torch.Tensor, device: torch.device, dtype_name: str
) -> Callable[[], Any]:
    def step() -> Any:
        with torch.inference_mode(), autocast_context(device, dtype_name):
            return model(pixel_values=pixel_values)

    return step


def benchmark_training(
    inference: InferenceModels, options: BenchmarkOptions, device: torch.device
) -> list[dict[str, Any]]:
    """Training-step time (forward + backward + AdamW step, train mode, labels, aux heads active) per dtype.

    `random` prunes like `cropr` without aux heads, so `time(cropr) / time(random) - 1` is what the Cropr modules
    (scorer, aggregator, auxiliary heads and their losses) cost in training.
    """
    batch_size = options.train_batch_size
    config = inference.config
    generator = torch.Generator().manual_seed(options.seed)
    height, width = config.image_size_hw
    pixel_values = torch.randn(batch_size, config.num_channels, height, width, generator=generator).to(device)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=generator).to(device)
    models = {}
    for variant in TRAINING_VARIANTS:
        torch.manual_seed(options.seed)
        model = CroprViTForImageClassification(build_config(options.preset, options.overrides, token_selector=variant))
        load_backbone_weights(model.cropr_vit, inference.backbone_state, "the benchmark backbone")
        models[variant] = model.to(device).train()
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in models.items()}
    entries = []
    for dtype_name in options.dtypes:
        steps = {
            name: _training_step(model, optimizers[name], pixel_values, labels, device, dtype_name)
            for name, model in models.items()
        }

        def progress(message: str, dtype_name=dtype_name) -> None:
            log(f"training {dtype_name} batch {batch_size}: {message}", options.quiet)

        samples = interleaved_timings(
            steps, device, max(options.warmup, 2), options.train_repeats, 0.0, progress, options.clock
        )
        results = {name: timing_summary(samples[name], batch_size) for name in steps}
        none, random, cropr = (results[name]["median_s"] for name in TRAINING_VARIANTS)
        entries.append(
            {
                "dtype": dtype_name,
                "batch_size": batch_size,
                "variants": results,
                "metrics": {
                    "speedup_cropr": none / cropr,
                    "speedup_random": none / random,
                    "aux_head_overhead": cropr / random - 1.0,
                },
            }
        )
    return entries


def _training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    dtype_name: str,
) -> Callable[[], None]:
    def step() -> None:
        with autocast_context(device, dtype_name):
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def benchmark_pipeline(inference: InferenceModels, options: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    """Per-photo latency of `pipeline("image-classification")`, pruned vs pruning off, image processing included."""
    config = build_config(options.preset, options.overrides)
    model = CroprViTForImageClassification(config)
    load_backbone_weights(model.cropr_vit, inference.backbone_state, "the benchmark backbone")
    model.to(device).eval().strip_training_modules()
    height, width = config.image_size_hw
    processor = ViTImageProcessorPil(size={"height": height, "width": width})
    return measure_pipeline_latency(
        model,
        processor,
        warmup=options.warmup,
        repeats=options.repeats,
        min_time=options.min_time,
        clock=options.clock,
    )


def benchmark_block_scaling(inference: InferenceModels, options: BenchmarkOptions, device: torch.device) -> list:
    """The benchmark backbone's blocks timed at each token count of the schedule, per dtype and batch size
    ([`measure_block_scaling`]; eager, also in a `--compile` run)."""
    pruned_config = inference.configs.get("cropr", inference.configs.get("random", inference.config))
    backbone = CroprViTModel(build_config(options.preset, options.overrides, token_selector="none"))
    load_backbone_weights(backbone, inference.backbone_state, "the benchmark backbone")
    backbone.to(device).eval()
    entries = []
    for dtype_name in options.dtypes:
        for batch_size in options.batch_sizes:

            def progress(message: str, dtype_name=dtype_name, batch_size=batch_size) -> None:
                log(f"block scaling {dtype_name} batch {batch_size}: {message}", options.quiet)

            result = measure_block_scaling(
                backbone.layers,
                pruned_config,
                batch_size,
                lambda dtype_name=dtype_name: autocast_context(device, dtype_name),
                warmup=options.warmup,
                repeats=options.repeats,
                min_time=options.min_time,
                clock=options.clock,
                progress=progress,
            )
            entries.append({"dtype": dtype_name, **result})
    return entries


# ----------------------------------------------------------------------------------------------------------------------
# Environment, report, CLI
# ----------------------------------------------------------------------------------------------------------------------
def environment(options: BenchmarkOptions, device: torch.device) -> dict[str, Any]:
    env = {
        **machine_environment(),
        "device": str(device),
        "dtypes": options.dtypes,
        "batch_sizes": options.batch_sizes,
        "clock": options.clock,
        "compile": (options.compile_backend + (f" {options.compile_mode}" if options.compile_mode else ""))
        if options.compile
        else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def check_device(name: str) -> torch.device:
    """The torch device named `name` (`cpu`, `cuda` or `cuda:N`), checked to exist on this machine.

    Raises:
        ValueError: for another device type, or a CUDA device that this torch build or machine does not have.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {name!r}: use cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"Device {name!r}: this torch build has no CUDA support (torch {torch.__version__}).")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"Device {name!r}: no CUDA GPU is visible.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"Device {name!r}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1}).")
    return device


def check_options(options: BenchmarkOptions) -> None:
    """Check the options before anything is allocated: names, the device and every variant's config.

    Raises:
        ValueError: (or `StrictDataclassError` for a config field of the wrong type) naming the first bad option.
    """
    unknown = [name for name in options.variants if name not in INFERENCE_VARIANTS]
    if unknown:
        raise ValueError(f"Unknown variants {unknown}; choose from {INFERENCE_VARIANTS}.")
    unknown = [name for name in options.dtypes if name not in DTYPES]
    if unknown:
        raise ValueError(f"Unknown dtypes {unknown}; choose from {sorted(DTYPES)}.")
    if check_device(options.device).type == "cpu" and "fp16" in options.dtypes:
        raise ValueError("fp16 autocast is for CUDA; use bf16 on CPU.")
    config = build_config(options.preset, options.overrides)
    for variant in options.variants:
        build_config(options.preset, options.overrides, token_selector=selector_of(variant))
    if options.pipeline:
        try:
            sample_photo(SAMPLE_PHOTOS[0])
        except ImportError as error:
            raise ValueError(f"--pipeline times real photos: {error}") from None
    if options.clock not in CLOCKS:
        raise ValueError(f"Unknown clock {options.clock!r}; choose from {sorted(CLOCKS)}.")
    if options.clock == "cpu" and (check_device(options.device).type != "cpu" or options.threads != 1):
        raise ValueError(
            "--clock cpu counts this process's CPU seconds, a fair clock only on the CPU with --threads 1 (more "
            "threads also count their idle spinning)."
        )
    if "hf" in options.variants:
        with torch.device("meta"):  # checks that transformers' model can take the shape, allocating nothing
            build_hf_model(PRESETS[options.preset].family, config)


def describe(options: BenchmarkOptions, pruned_config: CroprViTConfig) -> str:
    """The preset's description, or, when `--set` changed the model, its name with the measured shape and schedule
    (the preset's text would name the wrong image size or rate)."""
    preset = PRESETS[options.preset]
    if not options.overrides:
        return preset.description
    height, width = pruned_config.image_size_hw
    size = f"{height} px" if height == width else f"{height}x{width} px"
    tokens = pruned_config.token_counts()
    if not pruned_config.pruning_blocks:
        return f"{preset.name} at {size}, no pruning ({tokens[0]} tokens)"
    schedule = (
        f"R={pruned_config.pruning_rate} after every block"
        if pruned_config.pruning_schedule is None
        else f"schedule {pruned_config.pruning_schedule}"
    )
    fusion = " + LLF" if pruned_config.last_layer_fusion else ""
    last_pruned = tokens[-2] if pruned_config.last_layer_fusion else tokens[-1]
    return f"{preset.name} at {size}, {schedule}{fusion} ({tokens[0]} -> ... -> {last_pruned} tokens)"


def run_benchmark(options: BenchmarkOptions) -> dict[str, Any]:
    """Build the models, check them, count FLOPs and time inference (and training); returns the JSON-able report."""
    check_options(options)
    device = torch.device(options.device)
    if device.type == "cpu":
        torch.set_num_threads(options.threads or available_cores())
    elif options.threads:
        torch.set_num_threads(options.threads)
    inference = build_inference_models(options)
    config = inference.config
    pruned_config = inference.configs.get("cropr", inference.configs.get("random", config))
    description = describe(options, pruned_config)
    log(f"preset {options.preset}: {description}", options.quiet)
    height, width = config.image_size_hw
    check_input = torch.randn(2, config.num_channels, height, width, generator=torch.Generator().manual_seed(1))
    checks = check_outputs(inference.models, config, check_input)
    log("sanity check passed: " + json.dumps(checks), options.quiet)

    flops: dict[str, dict[str, Any]] = {}
    for name, model in inference.models.items():
        variant_config = inference.configs[name]
        analytic = variant_config.flops(pruned=name in PRUNED_VARIANTS)
        flops[name] = {"analytic_macs": analytic, "counted_macs": None}
        if options.count_flops:
            flops[name]["counted_macs"] = counted_macs(model, check_input[:1])
    for model in inference.models.values():
        model.to(device)

    report: dict[str, Any] = {
        "preset": options.preset,
        "description": description,
        "config": {
            key: getattr(config, key)
            for key in (
                "image_size",
                "patch_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "layerscale_value",
                "pruning_rate",
                "pruning_schedule",
                "last_layer_fusion",
            )
        },
        "token_counts": pruned_config.token_counts(),
        "flop_ceiling": pruned_config.flop_ceiling(),
        "flops": flops,
        "sanity": checks,
        "options": asdict(options),
        "environment": environment(options, device),
        "inference": benchmark_inference(inference, options, device),
        "training": [],
    }
    if options.train_batch_size:
        report["training"] = benchmark_training(inference, options, device)
    if options.pipeline:
        log("pipeline('image-classification') on the sample photos", options.quiet)
        report["pipeline"] = benchmark_pipeline(inference, options, device)
    if options.block_scaling:
        log("the blocks at each token count of the schedule", options.quiet)
        report["block_scaling"] = benchmark_block_scaling(inference, options, device)
    return report


# ----------------------------------------------------------------------------------------------------------------------
# One checkpoint at several pruning rates
# ----------------------------------------------------------------------------------------------------------------------
SAVED_SCHEDULE = "saved"
"""The name of a checkpoint's variant at the explicit schedule it was saved with."""


def rate_variants(checkpoint: str, rates: Sequence[int], saved_schedule: bool = False) -> dict[str, nn.Module]:
    """The checkpoint's model (eval mode) once per pruning rate, each a copy run at that rate, named "R=<rate>"; and
    with `saved_schedule`, the model as saved, named [`SAVED_SCHEDULE`].

    Raises:
        ValueError: for a rate the checkpoint cannot run (a schedule that removes every patch, or that needs a Cropr
            module the checkpoint lacks), naming it.
    """
    from ..cli import load_checkpoint

    model = load_checkpoint(checkpoint).eval()
    variants = {}
    for rate in rates:
        try:
            variants[f"R={rate}"] = copy.deepcopy(model).set_pruning_rate(rate).eval()
        except ValueError as error:
            raise ValueError(f"--pruning-rates {rate}: {error}") from None
    if saved_schedule:
        variants[SAVED_SCHEDULE] = model
    return variants


def benchmark_pruning_rates(options: BenchmarkOptions) -> dict[str, Any]:
    """Throughput of `options.checkpoint` at each of `options.pruning_rates`, timed interleaved per dtype and batch
    size, with each rate's token counts, analytic FLOP ceiling and speedup over the lowest rate."""
    device = torch.device(options.device)
    if device.type == "cpu":
        torch.set_num_threads(options.threads or available_cores())
    elif options.threads:
        torch.set_num_threads(options.threads)
    rates = sorted(set(options.pruning_rates))
    steps_by_name = rate_variants(options.checkpoint, rates, options.saved_schedule)
    baseline = next(iter(steps_by_name))
    config = steps_by_name[baseline].config
    for model in steps_by_name.values():
        model.to(device)
    height, width = config.image_size_hw
    entries = []
    for dtype_name in options.dtypes:
        for batch_size in options.batch_sizes:

            def progress(message: str, dtype_name=dtype_name, batch_size=batch_size) -> None:
                log(f"{dtype_name} batch {batch_size}: {message}", options.quiet)

            generator = torch.Generator().manual_seed(options.seed + batch_size)
            pixel_values = torch.randn(batch_size, config.num_channels, height, width, generator=generator).to(device)
            steps = {
                name: _inference_step(model, pixel_values, device, dtype_name) for name, model in steps_by_name.items()
            }
            samples = interleaved_timings(
                steps, device, options.warmup, options.repeats, options.min_time, progress=progress
            )
            results = {name: timing_summary(samples[name], batch_size) for name in steps}
            slowest = results[baseline]["throughput"]
            for result in results.values():
                result["speedup"] = result["throughput"] / slowest
            entries.append({"dtype": dtype_name, "batch_size": batch_size, "variants": results})
    saved = f" and its saved schedule {list(config.pruning_schedule or [])}" if options.saved_schedule else ""
    return {
        "checkpoint": str(options.checkpoint),
        "description": f"{options.checkpoint} at pruning rates {rates}{saved}",
        "rates": {
            name: {
                "pruning_rate": None if name == SAVED_SCHEDULE else model.config.pruning_rate,
                "pruning_schedule": model.config.effective_pruning_schedule,
                "token_counts": model.config.token_counts(),
                "flop_ceiling": model.config.flop_ceiling(),
            }
            for name, model in steps_by_name.items()
        },
        "options": asdict(options),
        "environment": environment(options, device),
        "inference": entries,
    }


def format_rates_report(report: dict[str, Any]) -> str:
    """The human-readable table of a [`benchmark_pruning_rates`] report."""
    env = report["environment"]
    lines = [
        f"CroprViT benchmark — {report['description']}",
        f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu_model']}, "
        f"{env['torch_threads']} thread(s), device {env['device']}",
        "",
    ]
    for name, rate in report["rates"].items():
        lines.append(f"{name:>6}: tokens per block {rate['token_counts']}, FLOP ceiling {rate['flop_ceiling']:.3f}x")
    lines += ["", f"{'dtype':<5} {'batch':>5} {'rate':>6} {'img/s':>10} {'speedup':>8} {'x ceil':>7}"]
    for entry in report["inference"]:
        for name, result in entry["variants"].items():
            ceiling = report["rates"][name]["flop_ceiling"]
            lines.append(
                f"{entry['dtype']:<5} {entry['batch_size']:>5} {name:>6} {result['throughput']:>10.2f} "
                f"{result['speedup']:>7.3f}x {result['speedup'] / ceiling:>7.3f}"
            )
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a report."""
    env = report["environment"]
    lines = [
        f"CroprViT benchmark — {report['description']}",
        f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu_model']}, "
        f"{env['torch_threads']} thread(s), device {env['device']}"
        + (", CPU-time clock" if env.get("clock") == "cpu" else "")
        + (f" ({env['gpu']})" if "gpu" in env else "")
        + (f", torch.compile {env['compile']}" if env["compile"] else ""),
        f"tokens per block: {report['token_counts']}",
        f"FLOP ceiling (analytic, unpruned / pruned MACs): {report['flop_ceiling']:.3f}x",
        "MACs per image (GMACs, analytic / counted): "
        + ", ".join(
            f"{name} {item['analytic_macs'] / 1e9:.3f}/"
            + ("-" if item["counted_macs"] is None else f"{item['counted_macs'] / 1e9:.3f}")
            for name, item in report["flops"].items()
        ),
        "",
    ]
    variants = list(report["inference"][0]["variants"]) if report["inference"] else []
    header = f"{'dtype':<5} {'batch':>5} " + " ".join(f"{name + ' img/s':>12}" for name in variants)
    header += f" {'speedup':>8} {'x ceil':>7} {'router':>7} {'none/hf':>8} {'best x ceil':>11}"
    header += f" {'ideal':>7} {'x ceil':>7} {'routing':>8}  targets"
    lines += ["Inference throughput (median over repeats)", header]
    for entry in report["inference"]:
        metrics = entry["metrics"]
        row = f"{entry['dtype']:<5} {entry['batch_size']:>5} "
        row += " ".join(f"{entry['variants'][name]['throughput']:>12.2f}" for name in variants)
        columns = (
            (metrics.get("speedup_cropr"), "{:.3f}x", 8),
            (metrics.get("ceiling_fraction"), "{:.3f}", 7),
            (metrics.get("router_overhead"), "{:+.1%}", 7),
            (metrics.get("none_vs_hf"), "{:.3f}", 8),
            (metrics["best"].get("ceiling_fraction"), "{:.3f}", 11),
            (metrics.get("speedup_ideal"), "{:.3f}x", 7),
            (metrics.get("ideal_ceiling_fraction"), "{:.3f}", 7),
            (metrics.get("routing_cost"), "{:+.1%}", 8),
        )
        row += "".join(f" {format_optional(value, pattern):>{width}}" for value, pattern, width in columns) + "  "
        row += ", ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in metrics["targets"].items())
        lines.append(row)
    latency = [entry for entry in report["inference"] if entry["batch_size"] == 1]
    if latency:
        lines += ["", "Batch-1 latency (ms, median)"]
        for entry in latency:
            lines.append(
                f"{entry['dtype']:<5} "
                + ", ".join(f"{name} {result['latency_ms']:.2f}" for name, result in entry["variants"].items())
            )
    if report.get("pipeline"):
        result = report["pipeline"]
        latency = result["latency_ms"]
        lines += [
            "",
            f"pipeline('image-classification') on {result['photos']} photos, one at a time (ms per photo, median)",
            f"image processor {latency['processor']:.2f}, pruned pipeline {latency['cropr']:.2f}, pruning off "
            f"{latency['none']:.2f}; speedup {result['speedup']:.3f}x ({result['ceiling_fraction']:.3f} of the "
            f"ceiling); image processing is {result['processor_share']:.1%} of a pruned call",
        ]
    if report.get("block_scaling"):
        lines += ["", "The blocks at each token count of the schedule (eager; ms per block, median)"]
        for entry in report["block_scaling"]:
            lines += format_block_scaling(entry["dtype"], entry)
    if report["training"]:
        lines += ["", "Training step (forward + backward + AdamW, aux heads active; ms, median)"]
        for entry in report["training"]:
            metrics = entry["metrics"]
            lines.append(
                f"{entry['dtype']:<5} batch {entry['batch_size']}: "
                + ", ".join(f"{name} {result['latency_ms']:.1f}" for name, result in entry["variants"].items())
                + f"; speedup cropr {metrics['speedup_cropr']:.3f}x, random {metrics['speedup_random']:.3f}x,"
                f" aux heads {metrics['aux_head_overhead']:+.1%} vs random"
            )
    return "\n".join(lines)


def format_optional(value: float | None, pattern: str) -> str:
    """`pattern` filled with `value`, or "-" for a metric that was not measured."""
    return "-" if value is None else pattern.format(value)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _name_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def parse_args(argv: Sequence[str] | None = None) -> BenchmarkOptions:
    parser = argparse.ArgumentParser(
        prog="cropr-benchmark",
        description="Throughput / latency / FLOPs of CroprViT (none, random, cropr) vs transformers' ViT, DINOv2, "
        "DINOv3 or SigLIP; or, given a checkpoint, its throughput at each of --pruning-rates.",
    )
    parser.add_argument(
        "checkpoint", nargs="?", help="a saved CroprViT checkpoint folder to time at each of --pruning-rates"
    )
    parser.add_argument(
        "--pruning-rates",
        type=int_list(0),
        help="with CHECKPOINT: comma list of pruning rates to time it at (default: 0 and its own rate, or its saved "
        "schedule when it has an explicit one)",
    )
    parser.add_argument("--preset", default="vit-b16", choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--dtypes", type=_name_list, help="comma list of fp32,bf16,fp16 (default: all the device runs)")
    parser.add_argument("--batch-sizes", type=int_list(1), help="comma list (default 1,8,32 on CPU, 1,8,32,64 on GPU)")
    parser.add_argument("--variants", type=_name_list, default=list(INFERENCE_VARIANTS), help="subset of hf,none,...")
    parser.add_argument("--pruning-rate", type=bounded_int(0), help="tokens removed per module (overrides the preset)")
    parser.add_argument("--pruning-schedule", type=parse_schedule, help="tokens removed after each block (0 = none)")
    parser.add_argument("--llf", action=argparse.BooleanOptionalAction, default=None, help="Last Layer Fusion")
    parser.add_argument("--image-size", type=bounded_int(1), help="input resolution (overrides the preset)")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other CroprViTConfig field, value parsed as JSON (repeatable)",
    )
    parser.add_argument("--warmup", type=bounded_int(0), default=3, help="warm-up calls per variant")
    parser.add_argument(
        "--repeats", type=bounded_int(1), default=7, help="interleaved samples per variant (median reported)"
    )
    parser.add_argument(
        "--min-time", type=non_negative_float, default=1.0, help="seconds per sample (calls are repeated)"
    )
    parser.add_argument("--threads", type=bounded_int(1), help="torch threads (default: all available cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (dynamic=False)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (implies --compile); reduce-overhead replays CUDA graphs, which removes the "
        "per-kernel launch cost that dominates small batches on a GPU",
    )
    parser.add_argument(
        "--train-batch-size", type=bounded_int(0), default=8, help="training-step batch size; 0 skips it"
    )
    parser.add_argument("--train-repeats", type=bounded_int(1), default=5)
    parser.add_argument("--no-flop-count", dest="count_flops", action="store_false", help="skip FlopCounterMode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="also time pipeline('image-classification') on single real photos (needs scikit-image), pruned vs off",
    )
    parser.add_argument(
        "--block-scaling",
        action="store_true",
        help="also time the blocks at each token count of the schedule: their fixed cost per call and the speedup "
        "the blocks alone allow",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU seconds, unaffected by other processes on a shared "
        "machine (needs --threads 1)",
    )
    parser.add_argument("--output", type=output_file, help="write the JSON report here")
    parser.add_argument(
        "--markdown", type=output_file, help="append a markdown section (command, machine load, table) to this file"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    overrides = dict(args.overrides)
    for key, value in (
        ("pruning_rate", args.pruning_rate),
        ("pruning_schedule", args.pruning_schedule),
        ("last_layer_fusion", args.llf),
        ("image_size", args.image_size),
    ):
        if value is not None:
            overrides[key] = value
    if args.pruning_rates is not None and args.checkpoint is None:
        parser.error(
            "--pruning-rates times a checkpoint: give its folder, e.g. `cropr benchmark CHECKPOINT "
            "--pruning-rates 0,4,8`"
        )
    options = BenchmarkOptions(
        preset=args.preset,
        overrides=overrides,
        checkpoint=args.checkpoint,
        pruning_rates=args.pruning_rates or [],
        device=device,
        dtypes=args.dtypes or (["fp32", "bf16", "fp16"] if gpu else ["fp32", "bf16"]),
        batch_sizes=args.batch_sizes or ([1, 8, 32, 64] if gpu else [1, 8, 32]),
        variants=args.variants,
        warmup=args.warmup,
        repeats=args.repeats,
        min_time=args.min_time,
        threads=args.threads,
        compile=args.compile or args.compile_mode is not None,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        train_batch_size=args.train_batch_size or None,
        train_repeats=args.train_repeats,
        count_flops=args.count_flops,
        seed=args.seed,
        clock=args.clock,
        pipeline=args.pipeline,
        block_scaling=args.block_scaling,
        quiet=args.quiet,
        output=None if args.output is None else str(args.output),
        markdown=None if args.markdown is None else str(args.markdown),
    )
    try:
        if options.checkpoint is None:
            check_options(options)
        else:
            check_checkpoint_options(options)
    except (ValueError, StrictDataclassError) as error:
        parser.error(" ".join(str(error).split()))
    return options


def check_checkpoint_options(options: BenchmarkOptions) -> None:
    """Check a checkpoint timing request before any model loads, and fill in the default: 0 and the checkpoint's own
    rate, or its saved schedule when it was saved at an explicit one.

    Raises:
        ValueError: for a missing checkpoint, a dtype or device this machine cannot run.
    """
    from ..cli import CliError, load_checkpoint_config

    try:
        config = load_checkpoint_config(options.checkpoint)
    except CliError as error:
        raise ValueError(str(error)) from None
    unknown = [name for name in options.dtypes if name not in DTYPES]
    if unknown:
        raise ValueError(f"Unknown dtypes {unknown}; choose from {sorted(DTYPES)}.")
    if check_device(options.device).type == "cpu" and "fp16" in options.dtypes:
        raise ValueError("fp16 autocast is for CUDA; use bf16 on CPU.")
    if not options.pruning_rates:
        # Saved at an explicit schedule (as the training scripts save a model converted from a backbone), a
        # checkpoint's `pruning_rate` is not what it runs: time that schedule itself.
        options.saved_schedule = config.pruning_schedule is not None
        options.pruning_rates = [0] if options.saved_schedule else sorted({0, config.pruning_rate})


def format_markdown(report: dict[str, Any], command: str) -> str:
    """A markdown section for `docs/benchmarks.md`: the command, the machine's state and the table, as measured."""
    env = report["environment"]
    load = env.get("load_average")
    # The allocator's variables are part of what was run: a run without them is another measurement.
    settings = "".join(f"{name}={shlex.quote(value)} " for name, value in env.get("allocator_settings", {}).items())
    return "\n".join(
        [
            f"## {report['description']}",
            "",
            f"Command: `{settings}{command}`",
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before the run "
            + (", ".join(f"{value:.2f}" for value in load) if load else "unknown")
            + f" on {os.cpu_count()} cores.",
            "",
            "```",
            format_rates_report(report) if "rates" in report else format_report(report),
            "```",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: prints the table, writes the JSON report to `--output` and appends a markdown
    section to `--markdown`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    if options.checkpoint is not None:
        try:
            report = benchmark_pruning_rates(options)
        except ValueError as error:
            print(f"cropr benchmark: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 1
        print(format_rates_report(report))
    else:
        report = run_benchmark(options)
        print(format_report(report))
    if options.output:
        with open(options.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        log(f"wrote {options.output}", options.quiet)
    if options.markdown:
        command = "python scripts/benchmark.py " + " ".join(argv)
        with open(options.markdown, "a", encoding="utf-8") as handle:
            handle.write(format_markdown(report, command) + "\n")
        log(f"appended to {options.markdown}", options.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
