"""Build CroprViT models from pretrained transformers ViT, DeiT, DINOv2 (with registers), DINOv3, CLIP and SigLIP
checkpoints.

Nobody trains a Token Cropr model from scratch: one starts from a pretrained backbone, adds Cropr modules (each
with its queries, aggregator and auxiliary head) and a task head, and fine-tunes. [`from_backbone`] does the first
step. The backbone weights (patch embedding, prefix tokens, position embeddings, blocks with their layer scales, final
LayerNorm) are copied from the source; an image classifier of the source is kept when the labels fit; everything
Cropr adds keeps the fresh initialisation of the CroprViT constructors. With `token_selector="none"` the converted
model computes exactly what the source computes.

```python
>>> from cropr.conversion import from_backbone
>>> model, image_processor = from_backbone(
...     "facebook/dinov2-small", "image-classification", image_size=224, num_labels=10, pruning_rate=16
... )
>>> model.save_pretrained("dinov2-s-cropr")
>>> image_processor.save_pretrained("dinov2-s-cropr")
```
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPForImageClassification,
    CLIPVisionModel,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    PreTrainedConfig,
    PreTrainedModel,
    SegformerImageProcessorPil,
    SiglipForImageClassification,
    SiglipVisionModel,
    ViTForImageClassification,
    ViTImageProcessorPil,
    ViTModel,
)
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.utils import logging

from .models.cropr_vit.configuration_cropr_vit import CroprViTConfig, as_pair
from .models.cropr_vit.modeling_cropr_vit import (
    CroprViTForImageClassification,
    CroprViTForMultiLabelClassification,
    CroprViTForSemanticSegmentation,
    CroprViTModel,
    CroprViTPreTrainedModel,
    missing_outside_pruning_modules,
    resize_position_embeddings,
)

logger = logging.get_logger(__name__)

# Task name -> CroprViT class built for it. "feature-extraction" gives the bare backbone (no head).
CONVERSION_TASKS: dict[str, type[CroprViTPreTrainedModel]] = {
    "feature-extraction": CroprViTModel,
    "image-classification": CroprViTForImageClassification,
    "multi-label-classification": CroprViTForMultiLabelClassification,
    "semantic-segmentation": CroprViTForSemanticSegmentation,
}

# Config fields that describe the pretrained architecture: they come from the source checkpoint and cannot be
# overridden (the copied weights would not fit, or would compute something else).
BACKBONE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "mlp_ratio",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
    "patch_size",
    "num_channels",
    "use_cls_token",
    "layerscale_value",
    "num_register_tokens",
    "use_distillation_token",
    "position_embedding_type",
    "rope_theta",
    "use_gated_mlp",
    "interpolate_antialias",
    "classifier_norm",
    "patch_embedding_bias",
    "pre_layernorm",
    "final_layernorm",
)

# Why some architectures that look close to a ViT are refused: the converted model would not compute the same thing.
UNSUPPORTED_REASONS = {
    "swin": "Swin is hierarchical with windowed attention, not a plain token sequence",
    "swinv2": "Swin is hierarchical with windowed attention, not a plain token sequence",
    "siglip2": (
        "'siglip2' checkpoints are SigLIP 2 NaFlex models (variable resolution and aspect ratio, patches flattened "
        "by the processor), which CroprViT's fixed patch grid does not run; the fixed-resolution SigLIP 2 "
        "checkpoints (google/siglip2-*-patch16-224 and the like) are 'siglip' checkpoints and are supported"
    ),
}
UNSUPPORTED_REASONS["siglip2_vision_model"] = UNSUPPORTED_REASONS["siglip2"]


@dataclass(frozen=True)
class SourceHead:
    """An image-classification head of a source architecture that CroprViT keeps.

    Attributes:
        model_class: the transformers class with that head.
        pooling: the [`CroprViTConfig`] `pooling` that gives the head's input.
        classifier: the head's linear layer as `(weight, bias)` over that pooled input.
        fields: other [`CroprViTConfig`] fields the head needs, as `(name, value)` pairs (CLIP's classifier reads the
            tokens before the post-LayerNorm: `final_layernorm="none"`).
    """

    model_class: type[PreTrainedModel]
    pooling: str
    classifier: Callable[[PreTrainedModel], tuple[torch.Tensor, torch.Tensor]]
    fields: tuple[tuple[str, Any], ...] = ()


def _linear_classifier(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    return model.classifier.weight, model.classifier.bias


def _deit_teacher_classifier(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """DeiT's two heads, averaged at inference, as one linear layer on the CLS and distillation tokens concatenated:
    (W_cls x_cls + b_cls + W_dist x_dist + b_dist) / 2 = [W_cls, W_dist] / 2 . [x_cls; x_dist] + (b_cls + b_dist) / 2.
    """
    cls_head, distillation_head = model.cls_classifier, model.distillation_classifier
    weight = torch.cat([cls_head.weight, distillation_head.weight], dim=1) / 2
    return weight, (cls_head.bias + distillation_head.bias) / 2


def _common_fields(config: PreTrainedConfig) -> dict:
    return dict(
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        use_cls_token=True,
        initializer_range=config.initializer_range,
    )


def _vit_fields(config: PreTrainedConfig) -> dict:
    return dict(
        _common_fields(config),
        intermediate_size=config.intermediate_size,
        qkv_bias=config.qkv_bias,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        use_distillation_token=config.model_type == "deit",
    )


def _dinov2_fields(config: PreTrainedConfig) -> dict:
    intermediate_size = int(config.hidden_size * config.mlp_ratio)
    fields = dict(_common_fields(config), layerscale_value=float(config.layerscale_value))
    if config.use_swiglu_ffn:
        # transformers' Dinov2SwiGLUFFN: two thirds of the MLP width, rounded up to a multiple of 8, and SiLU.
        intermediate_size = (int(intermediate_size * 2 / 3) + 7) // 8 * 8
        fields.update(use_gated_mlp=True, hidden_act="silu")
    return dict(
        fields,
        intermediate_size=intermediate_size,
        qkv_bias=config.qkv_bias,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        num_register_tokens=getattr(config, "num_register_tokens", 0),
    )


def _dinov3_fields(config: PreTrainedConfig) -> dict:
    return dict(
        _common_fields(config),
        intermediate_size=config.intermediate_size,
        layerscale_value=float(config.layerscale_value),
        use_gated_mlp=config.use_gated_mlp,
        num_register_tokens=config.num_register_tokens,
        position_embedding_type="rope",
        rope_theta=config.rope_theta,
        # A bias the source lacks (DINOv3's key projection) is converted as zeros, which compute the same.
        qkv_bias=True,
        attention_probs_dropout_prob=config.attention_dropout,
    )


@dataclass(frozen=True)
class BackboneFamily:
    """How one source architecture maps onto CroprViT.

    Attributes:
        model_type: the source config's `model_type`.
        model_class: the transformers base model loaded from a checkpoint path or Hub id.
        config_fields: the [`CroprViTConfig`] backbone fields (`BACKBONE_FIELDS`, dropouts) of a source config.
        renames: `(pattern, replacement)` regexes applied in order to each parameter name of the source base model,
            in both the transformers 5 names and the names of checkpoints saved by older versions.
        dropped: regexes of source parameters with no CroprViT counterpart (masked-image-modeling token, pooler).
        image_mean / image_std / resample: preprocessing used when the source has no `preprocessor_config.json`
            (that of the family's published checkpoints).
        always_interpolates: whether the source resizes its position embeddings for any input size on its own
            (DINOv2), or needs none (DINOv3's rotary embeddings), rather than only when asked with
            `interpolate_pos_encoding=True` (ViT, DeiT).
        heads: the image-classification heads kept by the conversion (the source's `architectures` name them).
        positioned_prefix_tokens: prefix tokens in the source's position embeddings (CLS, DeiT's distillation token).
        antialias: whether the source resizes its position embeddings with antialiasing (DINOv2 with registers).
    """

    model_type: str
    model_class: type[PreTrainedModel]
    config_fields: Callable[[PreTrainedConfig], dict]
    renames: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: PILImageResampling
    always_interpolates: bool
    heads: tuple[SourceHead, ...] = ()
    positioned_prefix_tokens: int = 1
    antialias: bool = False


# Renames shared by both families. Order matters: `attention.output.dense` must be renamed before a ViT's MLP
# `output.dense`, and the block prefix before the per-block names that anchor on it.
_COMMON_RENAMES = (
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.projection."),
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
)

_VIT_RENAMES = (
    *_COMMON_RENAMES,
    # Checkpoints saved before transformers 5 name the MLP `intermediate.dense` / `output.dense`.
    (r"^(layers\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"^(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
)
# DINOv2 and DINOv3 blocks: `norm1` / `norm2`, and the SwiGLU MLP's up and down projections are CroprViT's fc1 / fc2.
_DINO_BLOCK_RENAMES = (
    (r"^(layers\.\d+)\.norm1\.", r"\1.layernorm_before."),
    (r"^(layers\.\d+)\.norm2\.", r"\1.layernorm_after."),
    (r"^(layers\.\d+)\.mlp\.up_proj\.", r"\1.mlp.fc1."),
    (r"^(layers\.\d+)\.mlp\.down_proj\.", r"\1.mlp.fc2."),
)
_DINOV2_FAMILY = dict(
    config_fields=_dinov2_fields,
    renames=(*_COMMON_RENAMES, *_DINO_BLOCK_RENAMES),
    dropped=(r"^embeddings\.mask_token$",),
    image_mean=tuple(IMAGENET_DEFAULT_MEAN),
    image_std=tuple(IMAGENET_DEFAULT_STD),
    resample=PILImageResampling.BICUBIC,
    always_interpolates=True,
)

BACKBONE_FAMILIES: dict[str, BackboneFamily] = {
    "vit": BackboneFamily(
        model_type="vit",
        model_class=ViTModel,
        config_fields=_vit_fields,
        renames=_VIT_RENAMES,
        dropped=(r"^embeddings\.mask_token$", r"^pooler\."),
        image_mean=tuple(IMAGENET_STANDARD_MEAN),
        image_std=tuple(IMAGENET_STANDARD_STD),
        resample=PILImageResampling.BILINEAR,
        always_interpolates=False,
        heads=(SourceHead(ViTForImageClassification, "cls", _linear_classifier),),
    ),
    "deit": BackboneFamily(
        model_type="deit",
        model_class=DeiTModel,
        config_fields=_vit_fields,
        renames=_VIT_RENAMES,
        dropped=(r"^embeddings\.mask_token$", r"^pooler\."),
        image_mean=tuple(IMAGENET_DEFAULT_MEAN),
        image_std=tuple(IMAGENET_DEFAULT_STD),
        resample=PILImageResampling.BICUBIC,
        always_interpolates=False,
        heads=(
            SourceHead(DeiTForImageClassification, "cls", _linear_classifier),
            SourceHead(DeiTForImageClassificationWithTeacher, "cls_distillation", _deit_teacher_classifier),
        ),
        positioned_prefix_tokens=2,
    ),
    "dinov2": BackboneFamily(
        model_type="dinov2",
        model_class=Dinov2Model,
        heads=(SourceHead(Dinov2ForImageClassification, "cls_patch_mean", _linear_classifier),),
        **_DINOV2_FAMILY,
    ),
    "dinov2_with_registers": BackboneFamily(
        model_type="dinov2_with_registers",
        model_class=Dinov2WithRegistersModel,
        heads=(SourceHead(Dinov2WithRegistersForImageClassification, "cls_patch_mean", _linear_classifier),),
        antialias=True,
        **_DINOV2_FAMILY,
    ),
    "dinov3_vit": BackboneFamily(
        model_type="dinov3_vit",
        model_class=DINOv3ViTModel,
        config_fields=_dinov3_fields,
        renames=(
            (r"^embeddings\.patch_embeddings\.", "embeddings.projection."),
            (r"^model\.layer\.(\d+)\.", r"layers.\1."),
            *_DINO_BLOCK_RENAMES,
            (r"^norm\.", "layernorm."),
        ),
        dropped=(r"^embeddings\.mask_token$",),
        image_mean=tuple(IMAGENET_DEFAULT_MEAN),
        image_std=tuple(IMAGENET_DEFAULT_STD),
        resample=PILImageResampling.BILINEAR,
        always_interpolates=True,
    ),
}


def _vision_tower_fields(config: PreTrainedConfig) -> dict:
    # CLIP and SigLIP name neither `qkv_bias` nor a hidden dropout: their projections always have biases, and only
    # attention has dropout.
    return dict(
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        initializer_range=getattr(config, "initializer_range", 0.02),
        attention_probs_dropout_prob=config.attention_dropout,
    )


def _clip_fields(config: PreTrainedConfig) -> dict:
    # CLIPVisionModel: no patch-embedding bias, a LayerNorm before the blocks, the last hidden state as the blocks
    # leave it, and the post-LayerNorm on the pooled CLS token.
    return dict(
        _vision_tower_fields(config),
        use_cls_token=True,
        patch_embedding_bias=False,
        pre_layernorm=True,
        final_layernorm="pooled",
        pooling="cls",
    )


def _siglip_fields(config: PreTrainedConfig) -> dict:
    # No CLS token; SiglipVisionModel pools with its attention-pooling head when it has one.
    return dict(
        _vision_tower_fields(config),
        use_cls_token=False,
        pooling="map" if getattr(config, "vision_use_head", True) else "avg",
    )


# CLIP and SigLIP vision towers share their block layout (`encoder.layers.N.self_attn` / `layer_norm1` / `mlp`), and
# store the position embeddings as an `nn.Embedding` (its `(positions, D)` weight is reshaped on conversion).
_VISION_TOWER_RENAMES = (
    (r"^embeddings\.patch_embedding\.", "embeddings.projection."),
    (r"^embeddings\.position_embedding\.weight$", "embeddings.position_embeddings"),
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^pre_layrnorm\.", "pre_layernorm."),
    (r"^post_layernorm\.", "layernorm."),
    (r"^head\.", "map_head."),
    (r"^encoder\.layers\.(\d+)\.", r"layers.\1."),
    (r"\.self_attn\.out_proj\.", ".attention.o_proj."),
    (r"\.self_attn\.", ".attention."),
    (r"\.layer_norm1\.", ".layernorm_before."),
    (r"\.layer_norm2\.", ".layernorm_after."),
)
_CLIP_FAMILY = BackboneFamily(
    model_type="clip_vision_model",
    model_class=CLIPVisionModel,
    config_fields=_clip_fields,
    renames=_VISION_TOWER_RENAMES,
    dropped=(),
    image_mean=tuple(OPENAI_CLIP_MEAN),
    image_std=tuple(OPENAI_CLIP_STD),
    resample=PILImageResampling.BICUBIC,
    always_interpolates=False,
    # The classifier reads the mean of the patch tokens as the blocks leave them: the post-LayerNorm is not used.
    heads=(SourceHead(CLIPForImageClassification, "patch_mean", _linear_classifier, (("final_layernorm", "none"),)),),
)
_SIGLIP_FAMILY = BackboneFamily(
    model_type="siglip_vision_model",
    model_class=SiglipVisionModel,
    config_fields=_siglip_fields,
    renames=_VISION_TOWER_RENAMES,
    dropped=(),
    image_mean=tuple(IMAGENET_STANDARD_MEAN),
    image_std=tuple(IMAGENET_STANDARD_STD),
    resample=PILImageResampling.BICUBIC,
    always_interpolates=False,
    # The classifier reads the mean of the post-LayerNorm tokens, not the attention pooling.
    heads=(SourceHead(SiglipForImageClassification, "avg", _linear_classifier),),
    positioned_prefix_tokens=0,
)
# A full CLIP / SigLIP checkpoint ('clip', 'siglip': image and text towers, or an image classifier) converts through its
# vision tower ('clip_vision_model', 'siglip_vision_model'), whose config is its `vision_config`.
BACKBONE_FAMILIES.update(
    clip=_CLIP_FAMILY,
    clip_vision_model=_CLIP_FAMILY,
    siglip=_SIGLIP_FAMILY,
    siglip_vision_model=_SIGLIP_FAMILY,
)

SUPPORTED_MODEL_TYPES = tuple(BACKBONE_FAMILIES)


def vision_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The config of the vision tower: the `vision_config` of a composite CLIP / SigLIP config, else `config`."""
    sub_config = getattr(config, "vision_config", None)
    return sub_config if sub_config is not None else config


def backbone_family(config: PreTrainedConfig) -> BackboneFamily:
    """The [`BackboneFamily`] of a source config, or a `ValueError` naming its `model_type` and the supported ones."""
    model_type = config.model_type
    family = BACKBONE_FAMILIES.get(model_type)
    if family is None:
        reason = UNSUPPORTED_REASONS.get(model_type)
        raise ValueError(
            f"Cannot convert a {model_type!r} checkpoint to CroprViT"
            + (f": {reason}" if reason else "")
            + f". Supported architectures (`model_type`): {', '.join(repr(name) for name in SUPPORTED_MODEL_TYPES)} "
            "(their base models, image classifiers and backbones; the vision towers of CLIP and SigLIP)."
        )
    config = vision_config(config)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            f"Cannot convert a {model_type!r} checkpoint whose attention width ({config.num_attention_heads} heads x "
            f"{head_dim}) differs from `hidden_size` ({config.hidden_size}): CroprViT uses hidden_size / num_heads."
        )
    return family


def convert_backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model_type: str,
    source_grid: tuple[int, int] | None = None,
    target_grid: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Map the state dict of a source base model (`ViTModel`, `Dinov2Model`, ..., no head prefix) to CroprViTModel
    names.

    Both the transformers 5 names (`layers.N.attention.q_proj`, DINOv2 `encoder.layer.N.norm1`) and those of older
    checkpoints (`encoder.layer.N.attention.attention.query`, `attention.output.dense`, ViT `intermediate.dense` /
    `output.dense`) are accepted, and those of the CLIP / SigLIP vision towers. The mask token and pooler are
    dropped. When both grids are given and differ, the absolute position embeddings are resized with
    [`resize_position_embeddings`], as the source would resize them.
    """
    family = BACKBONE_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"Unsupported `model_type` {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}.")
    converted = {}
    for name, tensor in state_dict.items():
        if any(re.search(pattern, name) for pattern in family.dropped):
            continue
        for pattern, replacement in family.renames:
            name = re.sub(pattern, replacement, name)
        converted[name] = tensor
    key = "embeddings.position_embeddings"
    for name in (key, "embeddings.cls_token"):
        if name in converted and converted[name].dim() != 3:
            # CLIP and SigLIP keep them as (positions, D) and (D,); CroprViT as (1, positions, D).
            converted[name] = converted[name].reshape(1, -1, converted[name].shape[-1])
    if source_grid is not None and target_grid is not None and key in converted:
        converted[key] = resize_position_embeddings(
            converted[key], source_grid, target_grid, family.positioned_prefix_tokens, antialias=family.antialias
        )
    return complete_attention_biases(converted)


def complete_attention_biases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with zeros for the bias of a query, key or value projection that lacks one while the others of
    its block have theirs (DINOv3's key projection): CroprViT gives all three a bias or none, and a zero bias
    computes what no bias computes."""
    completed = dict(state_dict)
    for name in [name for name in state_dict if name.endswith(".attention.q_proj.weight")]:
        prefix = name[: -len("q_proj.weight")]
        biases = [f"{prefix}{projection}_proj.bias" for projection in "qkv"]
        if any(bias in completed for bias in biases):
            for bias in biases:
                if bias not in completed:
                    weight = completed[bias[: -len("bias")] + "weight"]
                    completed[bias] = weight.new_zeros(len(weight))
    return completed


def load_backbone_weights(backbone: CroprViTModel, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load converted backbone weights into `backbone`, where only the pruning modules may stay as initialised.

    Anything else missing or left over means the name mapping does not fit the checkpoint, and the model would
    silently be half random: that raises a `RuntimeError` naming `source` and the keys.
    """
    with torch.no_grad():
        result = backbone.load_state_dict(state_dict, strict=False)
    missing = missing_outside_pruning_modules(result.missing_keys)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Backbone weights of {source} do not map onto CroprViT: missing {missing}, "
            f"unexpected {result.unexpected_keys}."
        )


def cropr_config_from_backbone(
    source_config: PreTrainedConfig,
    task: str = "image-classification",
    *,
    image_size: int | tuple[int, int] | None = None,
    num_labels: int | None = None,
    id2label: Mapping[int | str, str] | None = None,
    source_head: SourceHead | None = None,
    **cropr_config_overrides,
) -> CroprViTConfig:
    """The [`CroprViTConfig`] of a CroprViT built on the backbone described by `source_config`.

    Backbone fields come from the source (the vision tower's config for CLIP and SigLIP); `image_size` defaults to
    the source's; `interpolate_pos_encoding` defaults to `True` for DINOv2 and DINOv3 (whose models take any size)
    and `False` for the others. Segmentation sets one query per patch, Last Layer Fusion and `aux_ignored_labels` (the
    classes named "background", unless overridden). With `source_head` (the source's classifier is kept) the labels
    come from the source and the pooling and classifier follow that head. An explicit `pruning_rate` that no module
    would use (the selector is "none", a `pruning_schedule` is given, or the backbone is too shallow for a per-block
    module) raises a `ValueError`. See [`from_backbone`] for the arguments.
    """
    family = backbone_family(source_config)
    if task not in CONVERSION_TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(CONVERSION_TASKS)}.")
    fixed = sorted(set(cropr_config_overrides) & {*BACKBONE_FIELDS, "image_size", "label2id"})
    if fixed:
        raise ValueError(
            f"{fixed} cannot be overridden: backbone fields come from the source checkpoint; pass `image_size` and "
            "`num_labels` / `id2label` as their own arguments."
        )
    labels_config, source_config = source_config, vision_config(source_config)
    if image_size is None:
        _check_source_size_fits_patches(source_config)
    kwargs = dict(
        family.config_fields(source_config),
        image_size=list(as_pair(image_size if image_size is not None else source_config.image_size)),
        interpolate_pos_encoding=family.always_interpolates,
        interpolate_antialias=family.antialias,
    )
    if source_head is not None:
        if task != "image-classification":
            raise ValueError(f"A source's classifier is kept for task 'image-classification' only, not {task!r}.")
        pooling = cropr_config_overrides.get("pooling", source_head.pooling)
        if pooling != source_head.pooling:
            raise ValueError(
                f"The kept {source_head.model_class.__name__} head reads `pooling={source_head.pooling!r}`, not "
                f"{pooling!r}; pass `keep_head=False` for a new head on another pooling."
            )
        kwargs.update(pooling=source_head.pooling, classifier_norm=False, **dict(source_head.fields))
        id2label = labels_config.id2label
    kwargs.update(_label_kwargs(task, num_labels, id2label))
    if task == "semantic-segmentation":
        (height, width), (patch_h, patch_w) = as_pair(kwargs["image_size"]), as_pair(kwargs["patch_size"])
        # Explicit conflicting values are left in so that the segmentation head's own check explains the problem.
        kwargs.update(num_queries=(height // patch_h) * (width // patch_w), last_layer_fusion=True)
        # The segmentation head reads the tokens: an attention-pooling head, or a LayerNorm of the pooled output only
        # (CLIP's), would run for nothing, untrained.
        if kwargs.get("pooling") == "map":
            kwargs["pooling"] = "avg"
        if kwargs.get("final_layernorm") == "pooled":
            kwargs["final_layernorm"] = "none"
        if background := background_label_ids(kwargs.get("id2label", {})):
            kwargs["aux_ignored_labels"] = background
    kwargs.update(cropr_config_overrides)
    config = CroprViTConfig(**kwargs)
    if "pruning_rate" in cropr_config_overrides:
        # An explicit rate that removes nothing is a mistake, not a request for an unpruned model.
        config.check_pruning_rate_is_used()
    return config


def background_label_ids(id2label: Mapping[int, str]) -> list[int]:
    """The ids of the classes named "background" (any case): segmentation's Cropr modules skip them by default.

    Trained on a class that covers most patches, the per-patch queries learn to look at it, and their summed scores
    then keep its patches and drop the objects: on a frozen DINOv2-S/14 segmenter, calibrated routers fell below
    random selection that way.
    """
    return [int(index) for index, name in id2label.items() if str(name).lower() == "background"]


def _check_source_size_fits_patches(source_config: PreTrainedConfig) -> None:
    """Refuse to default to a source size that is no multiple of the patch size (SigLIP so400m/14 at 384 px): the
    source's patch embedding drops the remainder, CroprViT needs whole patches, so the size must be chosen."""
    (height, width), (patch_h, patch_w) = as_pair(source_config.image_size), as_pair(source_config.patch_size)
    if height % patch_h or width % patch_w:
        fitted_h, fitted_w = height - height % patch_h, width - width % patch_w
        raise ValueError(
            f"The source's image size {height}x{width} is not a multiple of its patch size {patch_h}x{patch_w}: its "
            f"patch embedding reads the top-left {fitted_h}x{fitted_w} pixels only. Pass `image_size=({fitted_h}, "
            f"{fitted_w})`: the converted model then reads the same {fitted_h // patch_h}x{fitted_w // patch_w} "
            "patches, on images resized to that size."
        )


def _label_kwargs(task: str, num_labels: int | None, id2label: Mapping[int | str, str] | None) -> dict:
    if task == "feature-extraction":
        return {}
    if id2label is not None:
        id2label = {int(index): str(label) for index, label in id2label.items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"`id2label` keys must be 0..{len(id2label) - 1}, got {sorted(id2label)}.")
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"`num_labels` ({num_labels}) differs from the {len(id2label)} entries of `id2label`.")
        return {"id2label": id2label, "label2id": {label: index for index, label in id2label.items()}}
    if num_labels is None:
        raise ValueError(f"Task {task!r} needs `num_labels` or `id2label` for its (freshly initialised) head.")
    if num_labels < 1:
        raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
    return {"num_labels": num_labels}


def _classifier_head(config: PreTrainedConfig, architectures: Sequence[str]) -> SourceHead | None:
    """The kept-head kind of a model of one of `architectures` with `config`, `None` for no image classifier
    CroprViT keeps (or one without labels)."""
    if config.num_labels < 1:
        return None
    return next((head for head in backbone_family(config).heads if head.model_class.__name__ in architectures), None)


def source_classifier(source: str | os.PathLike | PreTrainedModel, **from_pretrained_kwargs) -> SourceHead | None:
    """The image classifier of `source` (a Hub id, a folder or a model object) that `from_backbone` keeps for
    "image-classification", or `None` when the source has none that CroprViT keeps; reads only the config."""
    if isinstance(source, PreTrainedModel):
        return _classifier_head(source.config, [type(source).__name__])
    config = AutoConfig.from_pretrained(source, **from_pretrained_kwargs)
    return _classifier_head(config, config.architectures or [])


def _load_source(
    source: str | os.PathLike | PreTrainedModel, load_head: bool, **from_pretrained_kwargs
) -> tuple[PreTrainedModel, SourceHead | None]:
    """The source model and its kept-head kind ([`SourceHead`], `None` when it has no image classifier CroprViT keeps
    or `load_head` is off, and then only the base model is read), after checking the architecture from the config."""
    if isinstance(source, PreTrainedModel):
        return source, source_classifier(source)
    config = AutoConfig.from_pretrained(source, **from_pretrained_kwargs)
    family = backbone_family(config)
    head = _classifier_head(config, config.architectures or []) if load_head else None
    # transformers renames the parameters of checkpoints saved by older versions while loading, and drops a head
    # prefix (`vit.`, `dinov2.`) when a ViTFor* / Dinov2For* checkpoint is loaded into the base model, or the other
    # towers of a CLIP / SigLIP checkpoint when it is loaded into the vision tower (whose config is `vision_config`).
    model_class, model_config = (
        (family.model_class, vision_config(config)) if head is None else (head.model_class, config)
    )
    extra = {"add_pooling_layer": False} if model_class in (ViTModel, DeiTModel) else {}
    # Weights are read from safetensors only: transformers would otherwise fall back to unpickling a .bin file.
    from_pretrained_kwargs.setdefault("use_safetensors", True)
    model = model_class.from_pretrained(source, config=model_config, **extra, **from_pretrained_kwargs)
    return model, head


def _base_model(model: PreTrainedModel) -> PreTrainedModel:
    """The source's backbone: the `vision_model` of a CLIP / SigLIP model, else transformers' `base_model`, unless
    that names an inner module (DINOv3 models keep their encoder under `model`, which is also their base-model
    prefix)."""
    tower = getattr(model, "vision_model", None)
    if tower is not None:
        return tower
    base = model.base_model
    return base if hasattr(base, "embeddings") else model


def _without_unused_modules(state_dict: dict[str, torch.Tensor], config: CroprViTConfig) -> dict[str, torch.Tensor]:
    """The converted weights without the source modules that `config` does not compute: SigLIP's attention-pooling
    head under another pooling, CLIP's post-LayerNorm when its classifier, which does not read it, is kept."""
    unused = []
    if config.pooling != "map":
        unused.append("map_head.")
    elif not any(name.startswith("map_head.") for name in state_dict):
        raise ValueError(
            '`pooling="map"` needs a source with an attention-pooling head (a SigLIP vision tower with '
            "`vision_use_head=True`); choose another pooling."
        )
    if config.final_layernorm == "none":
        unused.append("layernorm.")
    return {name: tensor for name, tensor in state_dict.items() if not name.startswith(tuple(unused))}


def _head_to_keep(
    head: SourceHead | None,
    source_config: PreTrainedConfig,
    task: str,
    keep_head: bool | None,
    num_labels: int | None,
    id2label: Mapping[int | str, str] | None,
) -> SourceHead | None:
    """The source head to keep: by default when there is one and the labels asked for are the source's; `keep_head`
    True raises a `ValueError` saying why it cannot be kept, False never keeps it."""
    if keep_head is False:
        return None
    reason = None
    if task != "image-classification":
        reason = f"task {task!r} is not 'image-classification'"
    elif head is None:
        kinds = [head.model_class.__name__ for head in backbone_family(source_config).heads]
        reason = f"the source is no image classifier CroprViT keeps ({', '.join(kinds) or 'none for this family'})"
    elif num_labels is not None and num_labels != source_config.num_labels:
        reason = f"`num_labels={num_labels}` differs from the source's {source_config.num_labels}"
    elif id2label is not None and {int(key): str(value) for key, value in id2label.items()} != {
        int(key): str(value) for key, value in source_config.id2label.items()
    }:
        reason = "`id2label` differs from the source's labels"
    if reason is None:
        return head
    if keep_head:
        raise ValueError(f"Cannot keep the source's classifier: {reason}.")
    return None


# Preprocessing steps copied from the source's image processor as they are; the resize and the crop follow the
# converted model's size (`_resize_and_crop`). `do_resize` is not copied: the model needs one fixed input size.
_COPIED_PREPROCESSING = (
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def _source_processor_settings(
    source: str | os.PathLike | PreTrainedModel,
    image_processor: str | os.PathLike | ImageProcessingMixin | None,
    **from_pretrained_kwargs,
) -> dict | None:
    """The settings of the source's image processor (`to_dict()`, class defaults included), `None` without one."""
    if isinstance(image_processor, ImageProcessingMixin):
        return image_processor.to_dict()
    location = image_processor
    if location is None:
        location = source if not isinstance(source, PreTrainedModel) else (source.name_or_path or None)
    if location is None:
        return None
    try:
        # Loading the processor (rather than reading its JSON) resolves what the file leaves to its class: the
        # class defaults and what an integer `size` means (a square for ViT, the shortest edge for CLIP).
        return AutoImageProcessor.from_pretrained(location, **from_pretrained_kwargs).to_dict()
    except OSError:
        if image_processor is not None:
            raise
        return None


def _cropped_size(settings: dict | None) -> tuple[int, int] | None:
    """The size the source's processor crops its images to (what its model is run at), `None` when it does not."""
    crop = (settings or {}).get("crop_size") or {}
    if settings and settings.get("do_center_crop") and crop.get("height") and crop.get("width"):
        return crop["height"], crop["width"]
    return None


def _resize_and_crop(settings: dict, image_size: tuple[int, int], center_crop: bool) -> dict:
    """`size` (and the center crop) of the converted processor: the source's resize and crop scaled to `image_size`
    when the source crops (e.g. shortest edge 256, crop 224 becomes shortest edge 512, crop 448 at 448 px, and stays
    as it is at 224 px), else a resize of the whole image to `image_size`."""
    height, width = image_size
    whole_image = {"size": {"height": height, "width": width}, "do_center_crop": False}
    crop, resize = settings.get("crop_size") or {}, settings.get("size") or {}
    if not (center_crop and settings.get("do_center_crop") and crop.get("height") and crop.get("width")):
        return whole_image
    scale_h, scale_w = height / crop["height"], width / crop["width"]
    if resize.get("shortest_edge") and not resize.get("longest_edge"):
        size = {"shortest_edge": round(resize["shortest_edge"] * max(scale_h, scale_w))}
    elif resize.get("height") and resize.get("width"):
        size = {"height": round(resize["height"] * scale_h), "width": round(resize["width"] * scale_w)}
    else:
        logger.warning(
            f"The source's image processor resizes to {resize} before its center crop, which the converted processor "
            f"cannot scale to {height}x{width}: it resizes whole images to {height}x{width} instead."
        )
        return whole_image
    return {"size": size, "do_center_crop": True, "crop_size": {"height": height, "width": width}}


def _processor_settings(
    source_settings: dict | None, family: BackboneFamily, image_size: tuple[int, int], center_crop: bool
) -> dict:
    """Keyword arguments of the converted image processor: the source processor's preprocessing at the converted
    model's size, or without a source processor the family's mean, std and resampling filter on a plain resize."""
    if source_settings is None or "image_mean" not in source_settings or "image_std" not in source_settings:
        logger.warning(
            f"No image processor config found for the source: using the {family.model_type} defaults "
            f"image_mean={list(family.image_mean)}, image_std={list(family.image_std)}, "
            f"resample={family.resample.name}."
        )
        source_settings = {
            "image_mean": list(family.image_mean),
            "image_std": list(family.image_std),
            "resample": family.resample,
        }
    settings = {key: source_settings[key] for key in _COPIED_PREPROCESSING if key in source_settings}
    settings["image_mean"], settings["image_std"] = list(settings["image_mean"]), list(settings["image_std"])
    settings.setdefault("resample", family.resample)
    return {**settings, **_resize_and_crop(source_settings, image_size, center_crop)}


def from_backbone(
    source: str | os.PathLike | PreTrainedModel,
    task: str = "image-classification",
    *,
    image_size: int | tuple[int, int] | None = None,
    num_labels: int | None = None,
    id2label: Mapping[int | str, str] | None = None,
    image_processor: str | os.PathLike | ImageProcessingMixin | None = None,
    from_pretrained_kwargs: Mapping | None = None,
    keep_head: bool | None = None,
    center_crop: bool | None = None,
    **cropr_config_overrides,
) -> tuple[CroprViTPreTrainedModel, ViTImageProcessorPil | SegformerImageProcessorPil]:
    """Build a CroprViT model on a pretrained ViT, DeiT, DINOv2 or DINOv3 backbone, with a matching image processor.

    Args:
        source (`str`, `os.PathLike` or `PreTrainedModel`):
            A Hub id (e.g. `"google/vit-base-patch16-224-in21k"`, `"facebook/dinov2-base"`), a local directory
            written by `save_pretrained`, or a model object of the model types in [`SUPPORTED_MODEL_TYPES`]: "vit"
            (which includes the non-distilled facebook/deit-* checkpoints), "deit" (distilled DeiT, with its
            distillation token), "dinov2", "dinov2_with_registers" and "dinov3_vit" (registers, rotary position
            embeddings, SwiGLU); their base models, `*ForImageClassification` and backbones; and the vision tower of
            "clip" / "clip_vision_model" (`CLIPModel`, `CLIPVisionModel(WithProjection)`, `CLIPForImageClassification`)
            and "siglip" / "siglip_vision_model" (`SiglipModel`, `SiglipVisionModel`, `SiglipForImageClassification`;
            also the fixed-resolution SigLIP 2 checkpoints). Any other architecture raises a `ValueError`.
        task (`str`, defaults to `"image-classification"`):
            One of [`CONVERSION_TASKS`]: "image-classification", "multi-label-classification",
            "semantic-segmentation", or "feature-extraction" (the bare `CroprViTModel`). Segmentation gets one Cropr
            query per patch (`num_queries`), `last_layer_fusion=True`, and `aux_ignored_labels` set to the classes
            of `id2label` named "background" (as the segmentation training script does; pass `aux_ignored_labels=[]`
            to train the Cropr modules on them too).
        image_size (`int` or `(height, width)`, *optional*):
            Resolution of the converted model; defaults to the size the source's image processor crops to when the
            converted processor crops too (DINOv2 configs say 518 px while their processors crop 224, at which the
            source runs in its pipeline), else to the source config's. When it differs from the config's, the
            position embeddings are resized once here (float32 bicubic, as transformers does on the fly), so the
            converted model at that size computes what the source computes at that size. At other sizes the
            converted model interpolates from its own grid.
        num_labels (`int`, *optional*), id2label (`dict`, *optional*):
            Labels of a new task head (one of them is required for a new head; `label2id` is derived).
        image_processor (`str`, `os.PathLike` or image processor, *optional*):
            Where to take the preprocessing from, when not the source itself (e.g. a model object whose
            `name_or_path` has no `preprocessor_config.json`).
        from_pretrained_kwargs (`dict`, *optional*):
            Passed to the `from_pretrained` calls that read the source (`revision`, `cache_dir`, `token`, ...).
        keep_head (`bool`, *optional*):
            For "image-classification": whether to keep the source's classifier (`ViTForImageClassification`,
            `DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher`, `Dinov2ForImageClassification`,
            `Dinov2WithRegistersForImageClassification`, `CLIPForImageClassification`, `SiglipForImageClassification`)
            with its `id2label`, as a linear layer without LayerNorm on the pooling it reads (`pooling` "cls",
            "cls_distillation", "cls_patch_mean", "patch_mean" or "avg"). By default it is kept when
            the source has one and `num_labels` / `id2label` are not given or equal the source's; `False` always
            builds a new head, `True` raises a `ValueError` when it cannot be kept.
        center_crop (`bool`, *optional*):
            Whether the image processor center-crops as the source's does (DeiT, DINOv2 and CLIP resize the shortest
            edge, e.g. to 256, then crop 224; the resize is scaled with `image_size`). By default it does for
            "image-classification" and "feature-extraction", so that the converted pipeline sees what the source's
            sees, and not for "multi-label-classification" and "semantic-segmentation", whose labels and masks
            cover the whole image; `False` resizes whole images to `image_size`; `True` is refused for segmentation.
            Without a crop in the source's processor, or without a source processor, whole images are resized.
        **cropr_config_overrides:
            Any other [`CroprViTConfig`] field: `token_selector`, `pruning_rate`, `pruning_schedule`,
            `last_layer_fusion`, `pooling`, `aux_loss_weight`, `drop_path_rate`, `interpolate_pos_encoding`, ...
            Backbone fields (`hidden_size`, `patch_size`, ...) come from the source and cannot be overridden.

    Returns:
        `(model, image_processor)`: the CroprViT model (float32, train mode as built by its constructor) with the
        backbone weights (and a kept classifier) copied and the Cropr modules and a new head freshly initialised,
        and a `ViTImageProcessorPil` (`SegformerImageProcessorPil` with `do_reduce_labels=False` for segmentation)
        with the source processor's preprocessing (resampling filter, rescaling, mean and std, and its center crop as
        `center_crop` says) at `image_size`. When the source has no processor config: a resize to `image_size` with
        the family's defaults and a warning (mean/std 0.5 for ViT and SigLIP, OpenAI's for CLIP, ImageNet's for the
        others).
    """
    if center_crop is None:
        center_crop = task in ("image-classification", "feature-extraction")
    elif center_crop and task == "semantic-segmentation":
        raise ValueError("`center_crop=True` is not supported for semantic segmentation: masks cover the whole image.")
    from_pretrained_kwargs = dict(from_pretrained_kwargs or {})
    load_head = task == "image-classification" and keep_head is not False
    source_model, head = _load_source(source, load_head, **from_pretrained_kwargs)
    source_config = source_model.config
    family = backbone_family(source_config)
    head = _head_to_keep(head, source_config, task, keep_head, num_labels, id2label)
    source_settings = _source_processor_settings(source, image_processor, **from_pretrained_kwargs)
    if image_size is None:
        image_size = _cropped_size(source_settings) if center_crop else None
    config = cropr_config_from_backbone(
        source_config,
        task,
        image_size=image_size,
        num_labels=num_labels,
        id2label=id2label,
        source_head=head,
        **cropr_config_overrides,
    )
    model = CONVERSION_TASKS[task](config)

    tower_config = vision_config(source_config)
    (source_h, source_w), (patch_h, patch_w) = as_pair(tower_config.image_size), as_pair(tower_config.patch_size)
    source_grid = (source_h // patch_h, source_w // patch_w)
    state_dict = convert_backbone_state_dict(
        _base_model(source_model).state_dict(),
        family.model_type,
        source_grid=source_grid,
        target_grid=config.patch_grid,
    )
    state_dict = _without_unused_modules(state_dict, config)
    load_backbone_weights(model.base_model, state_dict, f"the {family.model_type!r} source")
    if head is not None:
        weight, bias = head.classifier(source_model)
        with torch.no_grad():
            model.classifier.linear.weight.copy_(weight)
            model.classifier.linear.bias.copy_(bias)

    settings = _processor_settings(source_settings, family, config.image_size_hw, center_crop)
    if task == "semantic-segmentation":
        return model, SegformerImageProcessorPil(do_reduce_labels=False, **settings)
    return model, ViTImageProcessorPil(**settings)


__all__ = [
    "BACKBONE_FAMILIES",
    "BackboneFamily",
    "CONVERSION_TASKS",
    "SUPPORTED_MODEL_TYPES",
    "background_label_ids",
    "backbone_family",
    "complete_attention_biases",
    "convert_backbone_state_dict",
    "cropr_config_from_backbone",
    "from_backbone",
    "load_backbone_weights",
    "resize_position_embeddings",
    "source_classifier",
    "vision_config",
    "SourceHead",
]
