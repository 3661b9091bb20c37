"""Build CroprViT models from pretrained transformers ViT, DINOv2, CLIP and SigLIP checkpoints.

Nobody trains a Token Cropr model from scratch: one starts from a pretrained backbone, adds Cropr modules (each
with its queries, aggregator and auxiliary head) and a task head, and fine-tunes. [`from_backbone`] does the first
step. The backbone weights (patch embedding, CLS token, position embeddings, blocks with their layer scales, final
LayerNorm, and the vision towers' pre-LayerNorm and attention-pooling head) are copied from the source; everything
Cropr adds keeps the fresh initialisation of the CroprViT constructors. A classifier of the source
(`CLIPForImageClassification`, `SiglipForImageClassification`) is kept with its labels; other task heads are new. With
`token_selector="none"` the converted model computes exactly what the source computes.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    CLIPForImageClassification,
    CLIPVisionModel,
    Dinov2Model,
    PreTrainedConfig,
    PreTrainedModel,
    SegformerImageProcessorPil,
    SiglipForImageClassification,
    SiglipVisionModel,
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
    "patch_embedding_bias",
    "pre_layernorm",
    "final_layernorm",
    "classifier_norm",
)

# Why some architectures that look close to a ViT are refused: the converted model would not compute the same thing.
UNSUPPORTED_REASONS = {
    "deit": (
        "distilled DeiT checkpoints have a distillation token besides CLS, which CroprViT does not have (the "
        "non-distilled facebook/deit-* checkpoints are 'vit' checkpoints and are supported)"
    ),
    "dinov2_with_registers": "register tokens are extra prefix tokens, which CroprViT does not have",
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
class BackboneFamily:
    """How one source architecture maps onto CroprViT.

    Attributes:
        model_type: the source config's `model_type`.
        model_class: the transformers base model loaded from a checkpoint path or Hub id.
        renames: `(pattern, replacement)` regexes applied in order to each parameter name of the source base model,
            in both the transformers 5 names and the names of checkpoints saved by older versions.
        dropped: regexes of source parameters with no CroprViT counterpart (masked-image-modeling token, pooler).
        image_mean / image_std / resample: preprocessing used when the source has no `preprocessor_config.json`
            (that of the family's published checkpoints).
        always_interpolates: whether the source resizes its position embeddings for any input size on its own
            (DINOv2), rather than only when asked with `interpolate_pos_encoding=True` (ViT).
        classification_class: the transformers class of the family with an image classifier (a Linear layer named
            `classifier`) that the conversion keeps, or `None`.
        layout: the [`CroprViTConfig`] fields that reproduce the family's tower, from the tower's config and whether
            the source's classifier is kept (what that classifier reads decides the pooling).
    """

    model_type: str
    model_class: type[PreTrainedModel]
    renames: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: PILImageResampling
    always_interpolates: bool
    classification_class: type[PreTrainedModel] | None = None
    layout: Callable[[PreTrainedConfig, bool], dict] | None = None


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

BACKBONE_FAMILIES: dict[str, BackboneFamily] = {
    "vit": BackboneFamily(
        model_type="vit",
        model_class=ViTModel,
        renames=(
            *_COMMON_RENAMES,
            # Checkpoints saved before transformers 5 name the MLP `intermediate.dense` / `output.dense`.
            (r"^(layers\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
            (r"^(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
        ),
        dropped=(r"^embeddings\.mask_token$", r"^pooler\."),
        image_mean=tuple(IMAGENET_STANDARD_MEAN),
        image_std=tuple(IMAGENET_STANDARD_STD),
        resample=PILImageResampling.BILINEAR,
        always_interpolates=False,
    ),
    "dinov2": BackboneFamily(
        model_type="dinov2",
        model_class=Dinov2Model,
        renames=(
            *_COMMON_RENAMES,
            (r"^(layers\.\d+)\.norm1\.", r"\1.layernorm_before."),
            (r"^(layers\.\d+)\.norm2\.", r"\1.layernorm_after."),
        ),
        dropped=(r"^embeddings\.mask_token$",),
        image_mean=tuple(IMAGENET_DEFAULT_MEAN),
        image_std=tuple(IMAGENET_DEFAULT_STD),
        resample=PILImageResampling.BICUBIC,
        always_interpolates=True,
    ),
}


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


def _clip_layout(config: PreTrainedConfig, keeps_classifier: bool) -> dict:
    # CLIPVisionModel: pre-LayerNorm, raw last hidden state, post-LayerNorm on the CLS token. Its classifier reads the
    # mean of the raw patch tokens, where the post-LayerNorm has no part.
    if keeps_classifier:
        return dict(patch_embedding_bias=False, pre_layernorm=True, final_layernorm="none", pooling="patch_mean")
    return dict(patch_embedding_bias=False, pre_layernorm=True, final_layernorm="pooled", pooling="cls")


def _siglip_layout(config: PreTrainedConfig, keeps_classifier: bool) -> dict:
    # No CLS token. SiglipVisionModel pools with its attention-pooling head (when it has one); its classifier reads the
    # mean of the (post-LayerNorm) tokens instead.
    uses_map = getattr(config, "vision_use_head", True) and not keeps_classifier
    return dict(use_cls_token=False, pooling="map" if uses_map else "avg")


_CLIP_FAMILY = BackboneFamily(
    model_type="clip_vision_model",
    model_class=CLIPVisionModel,
    renames=_VISION_TOWER_RENAMES,
    dropped=(),
    image_mean=tuple(OPENAI_CLIP_MEAN),
    image_std=tuple(OPENAI_CLIP_STD),
    resample=PILImageResampling.BICUBIC,
    always_interpolates=False,
    classification_class=CLIPForImageClassification,
    layout=_clip_layout,
)
_SIGLIP_FAMILY = BackboneFamily(
    model_type="siglip_vision_model",
    model_class=SiglipVisionModel,
    renames=_VISION_TOWER_RENAMES,
    dropped=(),
    image_mean=tuple(IMAGENET_STANDARD_MEAN),
    image_std=tuple(IMAGENET_STANDARD_STD),
    resample=PILImageResampling.BICUBIC,
    always_interpolates=False,
    classification_class=SiglipForImageClassification,
    layout=_siglip_layout,
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
            "(ViTModel / ViTFor*, Dinov2Model / Dinov2For* / Dinov2Backbone, the vision tower of CLIPModel / "
            "CLIPVisionModel / CLIPForImageClassification and of SiglipModel / SiglipVisionModel / "
            "SiglipForImageClassification)."
        )
    config = vision_config(config)
    if getattr(config, "use_swiglu_ffn", False):
        raise ValueError(
            "Cannot convert a 'dinov2' checkpoint with `use_swiglu_ffn=True` (SwiGLU MLP, as in DINOv2-g): CroprViT "
            "blocks have a GELU MLP (fc1/fc2). Supported: 'dinov2' checkpoints with `use_swiglu_ffn=False` "
            "(facebook/dinov2-small/base/large) and 'vit' checkpoints."
        )
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
    """Map the state dict of a source base model (`ViTModel` / `Dinov2Model`, no head prefix) to CroprViTModel names.

    Both the transformers 5 names (`layers.N.attention.q_proj`, DINOv2 `encoder.layer.N.norm1`) and those of older
    checkpoints (`encoder.layer.N.attention.attention.query`, `attention.output.dense`, ViT `intermediate.dense` /
    `output.dense`) are accepted, and those of the CLIP / SigLIP vision towers. The mask token and pooler are
    dropped. When both grids are given and differ, the position embeddings are resized with
    [`resize_position_embeddings`].
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
    if source_grid is not None and target_grid is not None:
        # Position embeddings beyond the patch grid belong to the prefix (CLS; none in SigLIP).
        num_prefix_tokens = max(converted[key].shape[1] - source_grid[0] * source_grid[1], 0)
        converted[key] = resize_position_embeddings(converted[key], source_grid, target_grid, num_prefix_tokens)
    return converted


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
    keeps_classifier: bool = False,
    **cropr_config_overrides,
) -> CroprViTConfig:
    """The [`CroprViTConfig`] of a CroprViT built on the backbone described by `source_config`.

    Backbone fields come from the source (the vision tower's config for CLIP and SigLIP); `image_size` defaults to the
    source's; `interpolate_pos_encoding` defaults to `True` for DINOv2 (whose model always interpolates) and `False`
    otherwise. `keeps_classifier` builds the head as the source's classifier (a Linear layer without LayerNorm, on
    what the source's classifier pools). Segmentation sets one query per patch and Last Layer Fusion. An explicit
    `pruning_rate` that no module would use (the selector is "none", a `pruning_schedule` is given, or the backbone is
    too shallow for a per-block module) raises a `ValueError`. See [`from_backbone`] for the arguments.
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
    if keeps_classifier and "pooling" in cropr_config_overrides:
        raise ValueError(
            "`pooling` cannot be overridden while the source's classifier is kept: it reads what the source's "
            "classifier pools. Pass other `id2label` for a new head."
        )
    source_config = vision_config(source_config)
    if image_size is None:
        _check_source_size_fits_patches(source_config)
    if family.model_type == "dinov2":
        intermediate_size = int(source_config.hidden_size * source_config.mlp_ratio)
        layerscale_value = float(source_config.layerscale_value)
    else:
        intermediate_size = source_config.intermediate_size
        layerscale_value = None
    kwargs = dict(
        image_size=list(as_pair(image_size if image_size is not None else source_config.image_size)),
        patch_size=source_config.patch_size,
        num_channels=source_config.num_channels,
        hidden_size=source_config.hidden_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=source_config.num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_act=source_config.hidden_act,
        layer_norm_eps=source_config.layer_norm_eps,
        # CLIP and SigLIP name neither field: their projections always have biases, and only attention has dropout.
        qkv_bias=getattr(source_config, "qkv_bias", True),
        use_cls_token=True,
        layerscale_value=layerscale_value,
        initializer_range=getattr(source_config, "initializer_range", 0.02),
        hidden_dropout_prob=getattr(source_config, "hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=getattr(
            source_config, "attention_probs_dropout_prob", getattr(source_config, "attention_dropout", 0.0)
        ),
        interpolate_pos_encoding=family.always_interpolates,
        classifier_norm=not keeps_classifier,
    )
    if family.layout is not None:
        kwargs.update(family.layout(source_config, keeps_classifier))
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
    kwargs.update(cropr_config_overrides)
    config = CroprViTConfig(**kwargs)
    if "pruning_rate" in cropr_config_overrides:
        # An explicit rate that removes nothing is a mistake, not a request for an unpruned model.
        config.check_pruning_rate_is_used()
    return config


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


@dataclass(frozen=True)
class SourceClassifier:
    """The image classifier of a source checkpoint: its Linear layer and the labels of its outputs."""

    linear: nn.Linear
    id2label: dict[int, str]


def _vision_tower(model: PreTrainedModel) -> PreTrainedModel:
    """The vision tower of a source model: `vision_model` of a CLIP / SigLIP model, else its base model."""
    tower = getattr(model, "vision_model", None)
    return tower if tower is not None else model.base_model


def _load_source(
    source: str | os.PathLike | PreTrainedModel, **from_pretrained_kwargs
) -> tuple[PreTrainedModel, SourceClassifier | None]:
    """The source's vision tower (no head) and the classifier it has, if any, after checking its architecture from
    the config alone."""
    if isinstance(source, PreTrainedModel):
        family = backbone_family(source.config)
        model = source
    else:
        config = AutoConfig.from_pretrained(source, **from_pretrained_kwargs)
        family = backbone_family(config)
        # Weights are read from safetensors only: transformers would otherwise fall back to unpickling a .bin file.
        from_pretrained_kwargs.setdefault("use_safetensors", True)
        classifier_class = family.classification_class
        if classifier_class is not None and classifier_class.__name__ in (config.architectures or ()):
            model = classifier_class.from_pretrained(source, config=config, **from_pretrained_kwargs)
        else:
            # transformers renames the parameters of checkpoints saved by older versions while loading, and drops a
            # head prefix (`vit.`, `dinov2.`) or the other towers of a CLIP / SigLIP checkpoint when it is loaded into
            # the base model or vision tower.
            extra = {"add_pooling_layer": False} if family.model_type == "vit" else {}
            tower = family.model_class.from_pretrained(
                source, config=vision_config(config), **extra, **from_pretrained_kwargs
            )
            return tower, None
    classifier = None
    if family.classification_class is not None and isinstance(model, family.classification_class):
        if isinstance(model.classifier, nn.Linear):  # `nn.Identity` when built with `num_labels=0`
            id2label = {int(index): str(label) for index, label in model.config.id2label.items()}
            classifier = SourceClassifier(model.classifier, id2label)
    return _vision_tower(model), classifier


def _keeps_classifier(
    task: str,
    classifier: SourceClassifier | None,
    num_labels: int | None,
    id2label: Mapping[int | str, str] | None,
) -> bool:
    """Whether the converted head is the source's classifier: for image classification, unless other labels are asked
    for (then the head is new, with a warning)."""
    if classifier is None or task != "image-classification":
        return False
    asked = {int(index): str(label) for index, label in id2label.items()} if id2label is not None else None
    if (asked is None or asked == classifier.id2label) and num_labels in (None, len(classifier.id2label)):
        return True
    logger.warning(
        f"The source's classifier ({len(classifier.id2label)} classes) is not kept: other labels were given, so the "
        "head is new."
    )
    return False


def _without_unused_modules(state_dict: dict[str, torch.Tensor], config: CroprViTConfig) -> dict[str, torch.Tensor]:
    """The converted weights without the source modules that `config` does not compute: SigLIP's attention-pooling
    head under another pooling, CLIP's post-LayerNorm when its classifier, which does not read it, is kept."""
    unused = []
    if config.pooling != "map":
        unused.append("map_head.")
    elif not any(name.startswith("map_head.") for name in state_dict):
        raise ValueError(
            '`pooling="map"` needs a source with an attention-pooling head (a SigLIP vision tower with '
            '`vision_use_head=True`); choose "avg", "patch_mean" or "cls".'
        )
    if config.final_layernorm == "none":
        unused.append("layernorm.")
    return {name: tensor for name, tensor in state_dict.items() if not name.startswith(tuple(unused))}


def _normalization_settings(
    source: str | os.PathLike | PreTrainedModel,
    image_processor: str | os.PathLike | ImageProcessingMixin | None,
    family: BackboneFamily,
    **from_pretrained_kwargs,
) -> dict:
    """`image_mean`, `image_std` and `resample` of the source's image processor, else the family's defaults."""
    if isinstance(image_processor, ImageProcessingMixin):
        settings = image_processor.to_dict()
    else:
        location = image_processor
        if location is None:
            location = source if not isinstance(source, PreTrainedModel) else (source.name_or_path or None)
        settings = None
        if location is not None:
            try:
                settings, _ = ImageProcessingMixin.get_image_processor_dict(location, **from_pretrained_kwargs)
            except OSError:
                if image_processor is not None:
                    raise
    if settings is None or "image_mean" not in settings or "image_std" not in settings:
        logger.warning(
            f"No image processor config found for the source: using the {family.model_type} defaults "
            f"image_mean={list(family.image_mean)}, image_std={list(family.image_std)}, "
            f"resample={family.resample.name}."
        )
        return {
            "image_mean": list(family.image_mean),
            "image_std": list(family.image_std),
            "resample": family.resample,
        }
    return {
        "image_mean": list(settings["image_mean"]),
        "image_std": list(settings["image_std"]),
        "resample": settings.get("resample", family.resample),
    }


def from_backbone(
    source: str | os.PathLike | PreTrainedModel,
    task: str = "image-classification",
    *,
    image_size: int | tuple[int, int] | None = None,
    num_labels: int | None = None,
    id2label: Mapping[int | str, str] | None = None,
    image_processor: str | os.PathLike | ImageProcessingMixin | None = None,
    from_pretrained_kwargs: Mapping | None = None,
    **cropr_config_overrides,
) -> tuple[CroprViTPreTrainedModel, ViTImageProcessorPil | SegformerImageProcessorPil]:
    """Build a CroprViT model on a pretrained ViT, DINOv2, CLIP or SigLIP backbone, with a matching image processor.

    Args:
        source (`str`, `os.PathLike` or `PreTrainedModel`):
            A Hub id (e.g. `"google/vit-base-patch16-224-in21k"`, `"facebook/dinov2-base"`,
            `"google/siglip-base-patch16-224"`), a local directory written by `save_pretrained`, or a model object:
            `ViTModel` / `ViTFor*` (model type "vit", which includes the non-distilled facebook/deit-* checkpoints),
            `Dinov2Model` / `Dinov2For*` / `Dinov2Backbone` ("dinov2", without SwiGLU), the vision tower of
            `CLIPModel` / `CLIPVisionModel` / `CLIPForImageClassification` ("clip", "clip_vision_model") or of
            `SiglipModel` / `SiglipVisionModel` / `SiglipForImageClassification` ("siglip", "siglip_vision_model",
            which includes the fixed-resolution SigLIP 2 checkpoints). Any other architecture raises a `ValueError`.
        task (`str`, defaults to `"image-classification"`):
            One of [`CONVERSION_TASKS`]: "image-classification", "multi-label-classification",
            "semantic-segmentation", or "feature-extraction" (the bare `CroprViTModel`). Segmentation gets one Cropr
            query per patch (`num_queries`) and `last_layer_fusion=True`.
        image_size (`int` or `(height, width)`, *optional*):
            Resolution of the converted model; defaults to the source config's. When it differs, the position
            embeddings are resized once here (float32 bicubic, as transformers does on the fly), so the converted
            model at that size computes what the source computes at that size. At other sizes the converted model
            interpolates from its own grid.
        num_labels (`int`, *optional*), id2label (`dict`, *optional*):
            Labels of the new task head (one of them is required for the heads; `label2id` is derived). A source with
            an image classifier (`CLIPForImageClassification`, `SiglipForImageClassification`) keeps it, with its
            `id2label`, for "image-classification" unless other labels are given here.
        image_processor (`str`, `os.PathLike` or image processor, *optional*):
            Where to take the normalisation from, when not the source itself (e.g. a model object whose
            `name_or_path` has no `preprocessor_config.json`).
        from_pretrained_kwargs (`dict`, *optional*):
            Passed to the `from_pretrained` calls that read the source (`revision`, `cache_dir`, `token`, ...).
        **cropr_config_overrides:
            Any other [`CroprViTConfig`] field: `token_selector`, `pruning_rate`, `pruning_schedule`,
            `last_layer_fusion`, `pooling`, `aux_loss_weight`, `drop_path_rate`, `interpolate_pos_encoding`, ...
            Backbone fields (`hidden_size`, `patch_size`, ...) come from the source and cannot be overridden.

    Returns:
        `(model, image_processor)`: the CroprViT model (float32, train mode as built by its constructor) with the
        backbone weights (and the source's classifier, when kept) copied and the Cropr modules (and a new head)
        freshly initialised, and a `ViTImageProcessorPil`
        (`SegformerImageProcessorPil` with `do_reduce_labels=False` for segmentation) resizing to `image_size` with
        the source processor's mean, std and resampling filter (the family's defaults, with a warning, when the
        source has no processor config: mean/std 0.5 for ViT and SigLIP, ImageNet's for DINOv2, OpenAI's for CLIP).
    """
    from_pretrained_kwargs = dict(from_pretrained_kwargs or {})
    source_model, classifier = _load_source(source, **from_pretrained_kwargs)
    source_config = source_model.config
    family = backbone_family(source_config)
    keeps_classifier = _keeps_classifier(task, classifier, num_labels, id2label)
    config = cropr_config_from_backbone(
        source_config,
        task,
        image_size=image_size,
        num_labels=num_labels,
        id2label=classifier.id2label if keeps_classifier else id2label,
        keeps_classifier=keeps_classifier,
        **cropr_config_overrides,
    )
    model = CONVERSION_TASKS[task](config)

    (source_h, source_w), (patch_h, patch_w) = as_pair(source_config.image_size), as_pair(source_config.patch_size)
    source_grid = (source_h // patch_h, source_w // patch_w)
    state_dict = convert_backbone_state_dict(
        source_model.state_dict(), family.model_type, source_grid=source_grid, target_grid=config.patch_grid
    )
    state_dict = _without_unused_modules(state_dict, config)
    load_backbone_weights(model.base_model, state_dict, f"the {family.model_type!r} source")
    if keeps_classifier:
        with torch.no_grad():
            model.classifier.linear.load_state_dict(classifier.linear.state_dict())

    normalization = _normalization_settings(source, image_processor, family, **from_pretrained_kwargs)
    height, width = config.image_size_hw
    size = {"height": height, "width": width}
    if task == "semantic-segmentation":
        processor = SegformerImageProcessorPil(size=size, do_reduce_labels=False, **normalization)
    else:
        processor = ViTImageProcessorPil(size=size, **normalization)
    return model, processor


__all__ = [
    "BACKBONE_FAMILIES",
    "BackboneFamily",
    "CONVERSION_TASKS",
    "SUPPORTED_MODEL_TYPES",
    "backbone_family",
    "convert_backbone_state_dict",
    "cropr_config_from_backbone",
    "from_backbone",
    "load_backbone_weights",
    "resize_position_embeddings",
    "vision_config",
]
