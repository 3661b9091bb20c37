"""PyTorch CroprViT: a Vision Transformer with Token Cropr pruning and Last Layer Fusion, and its task heads."""

import copy
import dataclasses
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers import __version__ as transformers_version
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, WeightConverter
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_cropr_vit import LEARNED_SELECTORS, STRUCTURAL_FIELDS, CroprViTConfig
from .routing_cropr_vit import (
    CroprClassificationHead,
    CroprRouter,
    RoutingState,
    TokenSelector,
    patch_pixel_variance,
    rank_tokens,
    write_tokens,
)

# Checkpoints hold each block's query, key and value projections as three layers (`attention.q_proj`, `k_proj`,
# `v_proj`), as transformers' vision models do; the model runs them as one (`attention.qkv_proj`). `from_pretrained`
# concatenates them and `save_pretrained` splits them again, so every checkpoint, older or newer, has one layout.
CHECKPOINT_CONVERSION = [
    WeightConverter(
        source_patterns=[f"attention.{name}_proj.{kind}" for name in "qkv"],
        target_patterns=f"attention.qkv_proj.{kind}",
        operations=[Concatenate(dim=0)],
    )
    for kind in ("weight", "bias")
]
register_checkpoint_conversion_mapping(CroprViTConfig.model_type, CHECKPOINT_CONVERSION, overwrite=True)
UNFUSED_PROJECTION_KEY = re.compile(r"\.attention\.[qkv]_proj\.(?:weight|bias)$")


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class CroprViTModelOutput(ModelOutput):
    """
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
        Final-LayerNorm tokens (the last block's output when `config.final_layernorm` is "pooled" or "none"). With
        Last Layer Fusion (or no pruning): every token, in raster order (CLS first).
        Without it: only the tokens kept by the last module, CLS first, then by descending score.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, or `2 * hidden_size` wide):
        Mean of `last_hidden_state` over tokens (`pooling="avg"`, prefix tokens included), its CLS token
        (`pooling="cls"`), the mean of its patch tokens (`"patch_mean"`), its attention pooling (`"map"`), or the CLS
        token concatenated with the mean of the patch tokens (`"cls_patch_mean"`) or with the distillation token
        (`"cls_distillation"`), which are `2 * hidden_size` wide; then the final LayerNorm when
        `config.final_layernorm="pooled"`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Embeddings and each block's output; lengths shrink where tokens were pruned.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Each block's attention probabilities `(batch_size, num_heads, n, n)` for its own token count n.
    kept_indices (`tuple(torch.LongTensor)`, *optional*, returned when `output_kept_indices=True`):
        For each pruning module, the original positions of the tokens it kept (0 .. `num_prefix_tokens` - 1: CLS,
        distillation and register tokens when present; then the patches in raster order), shape
        `(batch_size, num_kept)`, in the order the tokens leave the module. Opt-in because pipelines split
        every tuple of an output along the batch.
    aux_logits (`tuple(torch.FloatTensor)`, *optional*, training only):
        For each Cropr module, its auxiliary head's logits `(batch_size, num_queries, num_labels)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    kept_indices: tuple[torch.LongTensor, ...] | None = None
    aux_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CroprViTImageClassifierOutput(ModelOutput):
    """
    loss (`torch.FloatTensor`, *optional*, when `labels` are given): main loss + `aux_loss_weight` x `aux_loss`.
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`).
    aux_loss (`torch.FloatTensor`, *optional*): sum of the Cropr modules' auxiliary losses (training only).
    hidden_states, attentions, kept_indices, aux_logits: see [`CroprViTModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    kept_indices: tuple[torch.LongTensor, ...] | None = None
    aux_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CroprViTSemanticSegmenterOutput(SemanticSegmenterOutput):
    """`SemanticSegmenterOutput` (logits at patch resolution) plus `aux_loss`, `kept_indices` and `aux_logits`."""

    aux_loss: torch.FloatTensor | None = None
    kept_indices: tuple[torch.LongTensor, ...] | None = None
    aux_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CroprViTBackboneOutput(BackboneOutput):
    """
    feature_maps (`tuple(torch.FloatTensor)`): one full patch grid per stage of `config.out_features` (see
        [`CroprViTBackbone`]).
    hidden_states, attentions: the blocks' own outputs, as [`CroprViTModelOutput`] (lengths shrink where tokens were
        pruned).
    aux_logits (`tuple(torch.FloatTensor)`, *optional*, training only): each Cropr module's auxiliary logits, for
        [`CroprViTBackbone.auxiliary_loss`].
    """

    aux_logits: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Backbone pieces
# ----------------------------------------------------------------------------------------------------------------------
def resize_position_embeddings(
    position_embeddings: torch.Tensor,
    source_grid: tuple[int, int],
    target_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    antialias: bool = False,
) -> torch.Tensor:
    """Resize `(1, prefix + h*w, D)` absolute position embeddings from the patch grid `source_grid` to `target_grid`.

    Bicubic, `align_corners=False`, computed in float32 and cast back: the interpolation transformers' ViT and DINOv2
    apply on the fly (`interpolate_pos_encoding`); `antialias=True` is that of DINOv2 with registers. The prefix (CLS,
    distillation) embeddings are kept as they are. Used at every forward on another input size, and once by the
    conversion of a backbone to another image size.
    """
    if tuple(source_grid) == tuple(target_grid):
        return position_embeddings
    prefix = position_embeddings[:, :num_prefix_tokens]
    patches = position_embeddings[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    if patches.shape[1] != source_grid[0] * source_grid[1]:
        raise ValueError(
            f"Position embeddings hold {patches.shape[1]} patch positions, not the {source_grid[0]}x{source_grid[1]} "
            "grid of the source config."
        )
    patches = patches.reshape(1, *source_grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(
        patches.float(), size=tuple(target_grid), mode="bicubic", align_corners=False, antialias=antialias
    )
    patches = patches.to(position_embeddings.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, patches], dim=1)


class CroprViTEmbeddings(nn.Module):
    """Patch embedding and prefix tokens, in the order CLS, distillation token, registers, patches; absolute position
    embeddings (interpolated for other sizes) for all but the registers, or none with rotary position embeddings."""

    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.patch_size = config.patch_size_hw
        self.image_size = config.image_size_hw
        self.num_channels = config.num_channels
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_cls_token else None
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        )
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
            if config.num_register_tokens
            else None
        )
        self.projection = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=config.patch_embedding_bias,
        )
        # Registers carry no position: they are inserted after the position embeddings are added.
        self.num_positioned_prefix_tokens = config.num_positioned_prefix_tokens
        self.position_embeddings = None
        if config.position_embedding_type == "absolute":
            num_positions = config.num_patches + self.num_positioned_prefix_tokens
            self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.antialias = config.interpolate_antialias
        self.grid_size = config.patch_grid
        self.num_prefix_tokens = config.num_prefix_tokens
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The position embeddings resized to another patch grid (see [`resize_position_embeddings`])."""
        return resize_position_embeddings(
            self.position_embeddings,
            self.grid_size,
            (grid_height, grid_width),
            self.num_positioned_prefix_tokens,
            antialias=self.antialias,
        )

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        embeddings = self.projection(pixel_values).flatten(2).transpose(1, 2)
        prefix = [token for token in (self.cls_token, self.distillation_token) if token is not None]
        if prefix:
            embeddings = torch.cat([*(token.expand(batch_size, -1, -1) for token in prefix), embeddings], dim=1)
        if self.position_embeddings is not None:
            if interpolate_pos_encoding:
                grid = (height // self.patch_size[0], width // self.patch_size[1])
                embeddings = embeddings + self.interpolate_pos_encoding(*grid)
            else:
                embeddings = embeddings + self.position_embeddings
        if self.register_tokens is not None:
            split = self.num_positioned_prefix_tokens
            registers = self.register_tokens.expand(batch_size, -1, -1)
            embeddings = torch.cat([embeddings[:, :split], registers, embeddings[:, split:]], dim=1)
        return self.dropout(embeddings)


def rotary_position_table(
    config: CroprViTConfig, grid: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine `(num_prefix + h*w, head_dim)` of DINOv3's 2-D rotary embedding for every token position.

    As `DINOv3ViTRopePositionEmbedding` (transformers) in eval mode: patch centres on a [-1, 1] grid per axis,
    frequencies `rope_theta ** -(4k / head_dim)`, angles `2 pi coordinate frequency`, computed in float32. Prefix
    tokens get angle 0 (cosine 1, sine 0), which leaves them unrotated as DINOv3 leaves them, bit for bit, so one
    table indexed by the tokens' positions serves every set of kept tokens.
    """
    head_dim = config.hidden_size // config.num_attention_heads
    grid_h, grid_w = grid
    inv_freq = 1 / config.rope_theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
    coords_h = torch.arange(0.5, grid_h, dtype=torch.float32, device=device) / grid_h
    coords_w = torch.arange(0.5, grid_w, dtype=torch.float32, device=device) / grid_w
    coords = 2.0 * torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
    angles = (2 * torch.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
    angles = F.pad(angles, (0, 0, config.num_prefix_tokens, 0))
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def rotate_half(hidden_states: torch.Tensor) -> torch.Tensor:
    first, second = hidden_states.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate `(batch, heads, n, head_dim)` queries or keys by the `(batch or 1, n, head_dim)` cosines and sines of
    their tokens."""
    cos, sin = (table.unsqueeze(1) for table in rotary)
    return hidden_states * cos + rotate_half(hidden_states) * sin


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attention_logits = (query @ key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attention_logits = attention_logits + attention_mask
    attention_probs = torch.softmax(attention_logits, dim=-1, dtype=torch.float32).to(query.dtype)
    attention_probs = F.dropout(attention_probs, p=dropout, training=module.training)
    output = (attention_probs @ value).transpose(1, 2).contiguous()
    return output, attention_probs


def fuse_checkpoint_projections(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """torch's `load_state_dict` of a checkpoint's three projections (the files `save_pretrained` writes, which the
    Trainer resumes from and backbone conversion produces) into `qkv_proj`, as `CHECKPOINT_CONVERSION` does for
    `from_pretrained`."""
    for kind in ("weight", "bias"):
        names = [f"{prefix}{projection}_proj.{kind}" for projection in "qkv"]
        if all(name in state_dict for name in names):
            state_dict[f"{prefix}qkv_proj.{kind}"] = torch.cat([state_dict.pop(name) for name in names])


class CroprViTAttention(nn.Module):
    """Multi-head self-attention through transformers' attention interface (SDPA by default).

    Falls back to the eager path when the attention probabilities are needed: `output_attentions`, or the
    `attention` selector reading them after a pruning block.
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        # One product for the queries, keys and values (rows in that order): on a CPU under bf16 autocast, one
        # weight cast and one matrix product per block instead of three. Checkpoints keep the three projections
        # (`CHECKPOINT_CONVERSION`).
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.register_load_state_dict_pre_hook(fuse_checkpoint_projections)

    def forward(
        self,
        hidden_states: torch.Tensor,
        need_weights: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        qkv = self.qkv_proj(hidden_states).view(*input_shape, 3, -1, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rotary is not None:
            query, key = apply_rotary(query, rotary), apply_rotary(key, rotary)
        attention_interface: Callable = eager_attention_forward
        if not need_weights:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        output, attention_probs = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, attention_probs


class CroprViTMLP(nn.Module):
    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CroprViTGatedMLP(nn.Module):
    """Gated MLP (SwiGLU with `silu`): `fc1` is the up projection and `fc2` the down projection, as in the plain
    MLP, and `gate_proj` the gate."""

    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.gate_proj(hidden_states)) * self.fc1(hidden_states))


class CroprViTLayerScale(nn.Module):
    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class CroprViTDropPath(nn.Module):
    """Stochastic depth per sample on the residual branch (identity outside training or at rate 0)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class CroprViTAttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (`pooling="map"`): a learned probe attends to the tokens, then a residual
    LayerNorm + MLP. Built as `SiglipMultiheadAttentionPoolingHead`, so that converted weights compute the same."""

    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CroprViTMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probe = self.probe.repeat(hidden_states.shape[0], 1, 1)
        pooled = self.attention(probe, hidden_states, hidden_states, need_weights=False)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class CroprViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block (ViT naming; optional DINOv2 layer scale).

    With Last Layer Fusion, the last block receives the full token map in raster order ([`RoutingState.fuse_tokens`]),
    so every reader of its output (the final norm, recorded hidden states) sees each token in its place.
    `rotary` holds the rotary cosines and sines of the current tokens (rotary position embeddings only).
    """

    def __init__(self, config: CroprViTConfig, drop_path_rate: float):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = CroprViTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CroprViTGatedMLP(config) if config.use_gated_mlp else CroprViTMLP(config)
        use_layer_scale = config.layerscale_value is not None
        self.layer_scale1 = CroprViTLayerScale(config) if use_layer_scale else nn.Identity()
        self.layer_scale2 = CroprViTLayerScale(config) if use_layer_scale else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = CroprViTDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        need_weights: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, attention_probs = self.attention(self.layernorm_before(hidden_states), need_weights, rotary)
        attention_output = self.layer_scale1(self.dropout(attention_output))
        hidden_states = hidden_states + self.drop_path(attention_output)
        mlp_output = self.layer_scale2(self.dropout(self.mlp(self.layernorm_after(hidden_states))))
        hidden_states = hidden_states + self.drop_path(mlp_output)
        return hidden_states, attention_probs


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained model base
# ----------------------------------------------------------------------------------------------------------------------
# The other CroprViTConfig fields, read at every forward: they may change on a built model and are checked when they do.
RUNTIME_FIELDS = tuple(
    field.name
    for field in dataclasses.fields(CroprViTConfig)
    if field.name in CroprViTConfig.__annotations__ and field.name not in STRUCTURAL_FIELDS
)
ROUTER_BUFFER_KEY = re.compile(r"(?:^|\.)token_selector\.routers\.(\d+)\.aggregated_query$")


def config_state(config: CroprViTConfig) -> tuple[tuple, tuple]:
    """(structural, runtime) field values of `config`, read from its `__dict__` (a few microseconds per forward)."""
    values = vars(config)
    id2label = values.get("id2label")
    structural = tuple(
        (len(id2label) if id2label is not None else None) if name == "num_labels" else values.get(name)
        for name in STRUCTURAL_FIELDS
    )
    return structural, tuple(values.get(name) for name in RUNTIME_FIELDS)


def structural_change_hint(name: str) -> str:
    """The supported way to get a model with another value of the structural field `name`."""
    if name == "token_selector":
        return "`model.with_token_selector(...)` gives the same weights with another selector"
    if name == "inference_only":
        return "`model.strip_training_modules()` removes the training modules"
    if name in ("pruning_rate", "pruning_schedule", "router_blocks"):
        return (
            "`model.set_pruning_rate(...)` or `model.set_pruning_schedule(...)` run the model at another schedule "
            "that its Cropr modules serve; a schedule needing new modules needs a model built for it, e.g. "
            "`from_pretrained(path, pruning_schedule=...)`"
        )
    return f"build a model for it: `from_pretrained(path, {name}=...)`, or the model class on a new config"


def router_blocks(state_dict_keys: Iterable[str]) -> set[int]:
    """Blocks whose Cropr router has an aggregated query among `state_dict_keys`."""
    return {int(match.group(1)) for key in state_dict_keys if (match := ROUTER_BUFFER_KEY.search(key))}


def missing_outside_pruning_modules(missing_keys: Iterable[str]) -> list[str]:
    """The keys of `missing_keys` outside the pruning modules (`token_selector.*`, under any prefix).

    Weights of a model with another selector or schedule, or of a plain ViT, lack only the pruning modules of the
    model they are loaded into; anything else missing means the weights do not fit and the model would be half random.
    """
    return [key for key in missing_keys if ".token_selector." not in f".{key}"]


def family_auto_map() -> dict[str, str]:
    """The `auto_map` entry of every class of the family registered with `register_for_auto_class`.

    transformers writes the entry of the saved class only; with every entry a checkpoint of any head also loads, with
    `trust_remote_code=True`, as the backbone (`AutoModel`) or another head.
    """
    classes = (CroprViTModel, CroprViTForImageClassification, CroprViTForSemanticSegmentation, CroprViTBackbone)
    return {
        cls._auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for cls in classes if cls._auto_class
    }


def untrained_router_error(
    model: "CroprViTPreTrainedModel", missing_keys: Iterable[str], unexpected_keys: Iterable[str]
) -> ValueError | None:
    """A `ValueError` when an inference-only model got routers without weights, else `None`.

    Stripped routers have no queries to train: one that was not loaded would score tokens with a vector nobody
    learned, so loading one is refused rather than reported as "newly initialized".
    """
    if not model.config.inference_only:
        return None
    untrained = sorted(router_blocks(missing_keys))
    if not untrained:
        return None
    available = sorted((set(model.config.blocks_with_routers) - set(untrained)) | router_blocks(unexpected_keys))
    alternative = (
        f"or a schedule that prunes only after blocks {available}, which have one"
        if available
        else 'or a selector without routers ("random", "variance", "attention" or "none"): the checkpoint has none'
    )
    return ValueError(
        f"The config asks for Cropr routers after blocks {untrained}, which this inference-only checkpoint (saved "
        "after `strip_training_modules()`) does not have, and a stripped router cannot be trained. Load the full "
        f"training checkpoint (saved before stripping), {alternative}."
    )


class CroprViTPreTrainedModel(PreTrainedModel):
    config_class = CroprViTConfig
    config: CroprViTConfig
    base_model_prefix = "cropr_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CroprViTEmbeddings", "CroprViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # `output_hidden_states` / `output_attentions` record each block's output and attention probabilities (as ViT).
    _can_record_outputs = {"hidden_states": CroprViTLayer, "attentions": CroprViTAttention}
    # The losses are means over the batch (and the auxiliary heads' over their queries), not sums to be divided by
    # Trainer's `num_items_in_batch`: Trainer then scales them for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: CroprViTConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        config.check_values()
        self._check_task_config(config)
        self._built_config = copy.deepcopy(config_state(config))

    def _check_task_config(self, config: CroprViTConfig) -> None:
        """What a head needs of the config beyond `config.check_values()` (nothing for the bare backbone)."""

    def check_config(self) -> None:
        """Raise a `ValueError` when the config no longer describes this model.

        Structural fields (`STRUCTURAL_FIELDS`: shapes, schedule, selector, ...) must keep the values the modules were
        built with; the other fields may change and are checked again when they do. Runs at every forward (outside
        `torch.compile`) and before saving, so a changed config fails at once instead of computing, or saving, a
        network it does not describe.
        """
        if torch.compiler.is_compiling():
            return
        state = config_state(self.config)
        if state == self._built_config:
            return
        built = dict(zip(STRUCTURAL_FIELDS, self._built_config[0], strict=True))
        for name, value in zip(STRUCTURAL_FIELDS, state[0], strict=True):
            if value != built[name]:
                raise ValueError(
                    f"`config.{name}` was changed from {built[name]!r} to {value!r} after this "
                    f"{type(self).__name__} was built, but its modules follow {built[name]!r}: it would compute, and "
                    f"save, a network its config does not describe. Set it back; to change it, "
                    f"{structural_change_hint(name)}."
                )
        self.config.check_values()
        self._check_task_config(self.config)
        self._built_config = copy.deepcopy(state)

    def _record_config(self) -> None:
        """Take the current config as the one this model (and its CroprViT submodules) is built with."""
        for module in self.modules():
            if isinstance(module, CroprViTPreTrainedModel):
                module._built_config = copy.deepcopy(config_state(module.config))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, CroprViTEmbeddings):
            tokens = (module.position_embeddings, module.cls_token, module.distillation_token, module.register_tokens)
            for parameter in tokens:
                if parameter is not None:
                    init.trunc_normal_(parameter, mean=0.0, std=std)
        elif isinstance(module, CroprViTLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif isinstance(module, CroprViTAttentionPoolingHead):
            init.trunc_normal_(module.probe, mean=0.0, std=std)
            init.trunc_normal_(module.attention.in_proj_weight, mean=0.0, std=std)
            init.zeros_(module.attention.in_proj_bias)
        elif isinstance(module, CroprRouter):
            if module.queries is not None:
                init.trunc_normal_(module.queries, mean=0.0, std=self.config.hidden_size**-0.5)
            # The aggregated query is the sum of the queries, computed whenever it is read: on entering eval mode,
            # after loading weights, before saving. Until then it holds zeros, as built (a stripped router's is only
            # ever loaded, and loading refuses one that is missing).
            init.zeros_(module.aggregated_query)

    def set_pruning_fraction(self, fraction: float) -> None:
        """Scale every module's removal count in training mode (0 = keep all tokens, 1 = the configured schedule).

        This is how the curriculum that raises R during training is applied; eval mode always uses the full
        schedule. Cropr modules keep training their auxiliary heads at every fraction, so no parameter goes unused
        (DDP needs no `find_unused_parameters`).
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"pruning fraction must be in [0, 1], got {fraction}")
        self.base_model.pruning_fraction = float(fraction)

    def set_pruning_rate(self, pruning_rate: int) -> "CroprViTPreTrainedModel":
        """Run the per-block schedule that removes `pruning_rate` tokens after each module (0 = no pruning), with the
        modules this model has: the speed dial of a trained checkpoint. See [`set_pruning_schedule`]."""
        return self._set_schedule(pruning_rate=pruning_rate, pruning_schedule=None)

    def set_pruning_schedule(self, pruning_schedule: list[int]) -> "CroprViTPreTrainedModel":
        """Run another schedule (tokens removed after each block, one entry per block) with the same weights.

        Cropr modules only rank tokens, so one trained module serves any count. The new schedule may prune after
        the blocks that have a module (`config.blocks_with_routers`), or fewer of them: unused modules are kept
        (`config.router_blocks`) and saved, so a heavier schedule can be set again later. A schedule pruning after a
        block without a module raises a `ValueError` naming the blocks that have one. The config records the new
        schedule, so `save_pretrained` writes a checkpoint that runs at it.
        """
        return self._set_schedule(pruning_rate=self.config.pruning_rate, pruning_schedule=list(pruning_schedule))

    def _set_schedule(self, pruning_rate: int, pruning_schedule: list[int] | None) -> "CroprViTPreTrainedModel":
        self.check_config()
        selector = self.base_model.token_selector
        module_blocks = sorted(int(block) for block in selector.routers) if selector.routers is not None else None
        candidate = copy.deepcopy(self.config)
        candidate.pruning_rate = pruning_rate
        candidate.pruning_schedule = pruning_schedule
        if module_blocks is not None:
            candidate.router_blocks = module_blocks
            if candidate.pruning_blocks == module_blocks:
                candidate.router_blocks = None
        candidate.check_values()
        self._check_task_config(candidate)
        for name in ("pruning_rate", "pruning_schedule", "router_blocks"):
            setattr(self.config, name, getattr(candidate, name))
        self.base_model.pruning_blocks = frozenset(self.config.pruning_blocks)
        self._record_config()
        return self

    def strip_training_modules(self) -> "CroprViTPreTrainedModel":
        """Remove every training-only parameter (queries, aggregators, auxiliary heads) for an inference checkpoint.

        Each Cropr module keeps only its aggregated query (the sum of its queries), which gives the same scores, so
        eval outputs are unchanged. The config is marked `inference_only=True` so `from_pretrained` rebuilds the
        stripped shape. A stripped model can still be fine-tuned: its routers then stay frozen.
        """
        selector = self.base_model.token_selector
        if selector.routers is not None:
            for router in selector.routers.values():
                router.refresh_aggregated_query()
                router.queries = None
                router.aggregator = None
                router.aux_head = None
        self.config.inference_only = True
        self._record_config()
        return self

    def refresh_routers(self) -> None:
        """Recompute every Cropr module's aggregated query from its queries (they drift apart while training)."""
        routers = self.base_model.token_selector.routers
        for router in routers.values() if routers is not None else ():
            router.refresh_aggregated_query()

    def with_token_selector(self, token_selector: str) -> "CroprViTPreTrainedModel":
        """The same network with another selector: backbone and head weights shared by copy, same schedule.

        Used to compare a trained model with pruning off (`"none"`) or with a training-free pruner (`"random"`,
        `"variance"`, `"attention"`) at identical weights. Cropr modules are kept when both selectors learn
        (`"cropr"` <-> `"non_salient"`) and freshly initialised otherwise.
        """
        config = self.config.__class__.from_dict({**self.config.to_dict(), "token_selector": token_selector})
        variant = self.__class__(config).to(device=self.device, dtype=self.dtype)
        missing, unexpected = variant.load_state_dict(self.state_dict(), strict=False)
        error = untrained_router_error(variant, missing, unexpected)
        if error is not None:
            raise error
        unexpected_missing = missing_outside_pruning_modules(missing)
        if unexpected_missing:
            raise RuntimeError(f"weights missing when switching selector: {unexpected_missing}")
        return variant.train(self.training)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` that checks the config before writing anything (transformers copies the
        code files first, then fails on an invalid config), stores up-to-date aggregated queries (so the checkpoint
        also loads inference-only), writes the `auto_map` of every class of the family, and removes the folder
        again when it created it and the save fails."""
        self.check_config()
        self.config.validate()
        self.refresh_routers()
        self.config.auto_map = {**family_auto_map(), **(getattr(self.config, "auto_map", None) or {})}
        created = not os.path.exists(save_directory)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        except BaseException:
            if created:
                shutil.rmtree(save_directory, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` that reads weights from safetensors files only.

        transformers 5 falls back to unpickling a `pytorch_model.bin` when no safetensors file is there; CroprViT
        checkpoints are always saved as safetensors, so that fallback is off (`use_safetensors=True` unless the
        caller passes `use_safetensors=False` explicitly) and such a folder raises an `OSError`. A `*.safetensors`
        file that cannot be read (truncated, overwritten) raises an `OSError` naming it. An inference-only checkpoint
        loaded with overrides that add a pruning module raises a `ValueError`: that module's router has no weights
        and cannot be trained. Query, key and value projections left unfused (a transformers without this model's
        `CHECKPOINT_CONVERSION`) raise a `RuntimeError`.
        """
        kwargs.setdefault("use_safetensors", True)
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            files = sorted(Path(pretrained_model_name_or_path).glob("*.safetensors"))
            broken = [str(file) for file in files if not _is_readable_safetensors(file)]
            where = ", ".join(broken) if broken else f"the safetensors weights of {pretrained_model_name_or_path}"
            raise OSError(
                f"Cannot read {where}: the file is truncated or not a safetensors file ({error}). Save the model "
                "again with `save_pretrained`, or download the checkpoint again."
            ) from error
        unfused = sorted(key for key in loading_info["unexpected_keys"] if UNFUSED_PROJECTION_KEY.search(key))
        if unfused:
            # Left over, they would leave `qkv_proj` at its random initialisation.
            raise RuntimeError(
                f"The checkpoint's query, key and value projections ({unfused[0]}, ...) were not fused into "
                f"`qkv_proj`: transformers {transformers_version} did not apply CroprViT's `CHECKPOINT_CONVERSION`. "
                "Upgrade transformers."
            )
        error = untrained_router_error(model, loading_info["missing_keys"], loading_info["unexpected_keys"])
        if error is not None:
            raise error
        return (model, loading_info) if output_loading_info else model


def _is_readable_safetensors(path: Path) -> bool:
    """Whether the safetensors header of `path` parses (only called to name the file after a load failed)."""
    try:
        with safe_open(path, framework="pt"):
            return True
    except SafetensorError:
        return False


def check_pixel_values(pixel_values: torch.Tensor | None, config: CroprViTConfig, interpolate: bool) -> None:
    """Reject inputs the model cannot read, with the expected value in the message (before any torch op fails)."""
    if pixel_values is None:
        raise ValueError("`pixel_values` is required: a float tensor of shape (batch, channels, height, width).")
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"`pixel_values` must have 4 dimensions (batch, channels, height, width), got shape "
            f"{tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"`pixel_values` must be a floating-point tensor (normalised by the image processor), got "
            f"{pixel_values.dtype}: use the model's image processor, or `.float()` after normalising."
        )
    batch_size, channels, height, width = pixel_values.shape
    if batch_size == 0:
        raise ValueError("`pixel_values` holds an empty batch (batch size 0).")
    if channels != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {channels} channels but the model expects {config.num_channels} "
            f"(`config.num_channels`)."
        )
    expected = config.image_size_hw
    patch_h, patch_w = config.patch_size_hw
    if not interpolate and (height, width) != expected:
        raise ValueError(
            f"Input image size ({height}x{width}) doesn't match the model ({expected[0]}x{expected[1]}); resize "
            "the images or pass `interpolate_pos_encoding=True`."
        )
    if height < patch_h or width < patch_w:
        raise ValueError(f"Input image size ({height}x{width}) is smaller than one patch ({patch_h}x{patch_w}).")


# Keyword arguments of `TransformersKwargs` that CroprViT reads; transformers passes no other to an image model.
FORWARD_KWARGS = frozenset({"output_attentions", "output_hidden_states"})


def check_forward_kwargs(kwargs: dict) -> None:
    """Raise a `TypeError` naming the keyword arguments no CroprViT forward reads: taken silently, an
    `attention_mask=` or `bool_masked_pos=` would look applied."""
    if kwargs and not FORWARD_KWARGS.issuperset(kwargs):
        unknown = ", ".join(f"`{name}`" for name in sorted(set(kwargs) - FORWARD_KWARGS))
        raise TypeError(
            f"CroprViT forward() got unexpected keyword arguments: {unknown}. It takes `pixel_values`, `labels` (task "
            "heads), `interpolate_pos_encoding`, `output_kept_indices`, `output_attentions`, `output_hidden_states` "
            "and `return_dict`."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------------
class CroprViTModel(CroprViTPreTrainedModel):
    """The CroprViT backbone: ViT blocks with a pruning module after each block of the schedule.

    Eval routing costs one (B, M, D)·(D) product, one sort and one batched gather per module, plus, with Last Layer
    Fusion, a row write of the set-aside tokens into the raster-ordered token map that the last block runs on, so its
    output is in raster order with every set-aside token back in its place.
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__(config)
        self.embeddings = CroprViTEmbeddings(config)
        self.pre_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm else None
        )
        drop_path_rates = [
            config.drop_path_rate * block / max(config.num_hidden_layers - 1, 1)
            for block in range(config.num_hidden_layers)
        ]
        if config.last_layer_fusion:
            drop_path_rates[-1] = 0.0
        self.layers = nn.ModuleList([CroprViTLayer(config, rate) for rate in drop_path_rates])
        self.layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.final_layernorm != "none" else None
        )
        self.map_head = CroprViTAttentionPoolingHead(config) if config.pooling == "map" else None
        self.token_selector = TokenSelector(config)
        self.pruning_blocks = frozenset(config.pruning_blocks)
        self.num_prefix_tokens = config.num_prefix_tokens
        self.pruning_fraction = 1.0
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.projection

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_kept_indices: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CroprViTModelOutput:
        r"""
        interpolate_pos_encoding (`bool`, *optional*, defaults to `config.interpolate_pos_encoding`):
            Accept images of another size than `config.image_size` (position embeddings resized, schedule scaled).
        output_kept_indices (`bool`, *optional*, defaults to `False`):
            Return each pruning module's kept token positions (`kept_indices`).
        kwargs:
            `output_attentions`, `output_hidden_states` (recorded from the blocks) and `return_dict`; any other keyword
            raises a `TypeError`.
        """
        check_forward_kwargs(kwargs)
        self.check_config()
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = self.config.interpolate_pos_encoding
        check_pixel_values(pixel_values, self.config, interpolate_pos_encoding)
        # Attention probabilities come from the eager path: for the attentions output, or the attention selector.
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding)
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)
        routing = self._start_routing(pixel_values, hidden_states, output_kept_indices)
        last_block = len(self.layers) - 1
        for block, layer in enumerate(self.layers):
            if block == last_block and routing.token_map is not None:
                hidden_states = routing.fuse_tokens(hidden_states)
            prunes_here = block in self.pruning_blocks
            need_weights = output_attentions or (prunes_here and self.token_selector.needs_attention)
            hidden_states, attention_probs = layer(hidden_states, need_weights, routing.rotary)
            if prunes_here:
                hidden_states = self._prune(block, hidden_states, attention_probs, routing)

        final_layernorm = self.config.final_layernorm
        sequence_output = self.layernorm(hidden_states) if final_layernorm == "tokens" else hidden_states
        pooled_output = self._pool(sequence_output)
        if final_layernorm == "pooled":
            pooled_output = self.layernorm(pooled_output)
        return CroprViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            kept_indices=tuple(routing.kept_indices) if routing.kept_indices is not None else None,
            aux_logits=tuple(routing.aux_logits) if routing.aux_logits else None,
        )

    def _pool(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """`pooler_output` by `config.pooling`; the patch tokens are those after the prefix tokens."""
        pooling = self.config.pooling
        if pooling == "avg":
            return sequence_output.mean(dim=1)
        if pooling == "patch_mean":
            return sequence_output[:, self.num_prefix_tokens :].mean(dim=1)
        if pooling == "map":
            return self.map_head(sequence_output)
        cls_token = sequence_output[:, 0]
        if pooling == "cls":
            return cls_token
        if pooling == "cls_patch_mean":
            return torch.cat([cls_token, sequence_output[:, self.num_prefix_tokens :].mean(dim=1)], dim=1)
        return torch.cat([cls_token, sequence_output[:, 1]], dim=1)

    def _start_routing(
        self, pixel_values: torch.Tensor, hidden_states: torch.Tensor, output_kept_indices: bool
    ) -> RoutingState:
        """The routing state at the embeddings: every token in its place, this input's schedule."""
        config = self.config
        batch_size, num_tokens, _ = hidden_states.shape
        num_prefix = self.num_prefix_tokens
        # The curriculum fraction is a training schedule: evaluation always measures the target schedule.
        fraction = self.pruning_fraction if self.training else 1.0
        pixel_variance = None
        if self.token_selector.needs_pixel_variance:
            pixel_variance = F.pad(patch_pixel_variance(pixel_values, config.patch_size_hw), (num_prefix, 0))
        rotary_table = None
        if config.position_embedding_type == "rope":
            patch_h, patch_w = config.patch_size_hw
            grid = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
            rotary_table = rotary_position_table(config, grid, hidden_states.device, hidden_states.dtype)
        last_layer_fusion = config.last_layer_fusion and bool(self.pruning_blocks)
        positions = None
        if last_layer_fusion or rotary_table is not None or output_kept_indices:
            positions = torch.arange(num_tokens, device=hidden_states.device).expand(batch_size, -1)
        prefix_index = None
        if num_prefix:
            prefix_index = torch.arange(num_prefix, device=hidden_states.device).expand(batch_size, -1)
        return RoutingState(
            num_tokens=num_tokens,
            keep_counts=config.patch_keep_counts(num_tokens - num_prefix, fraction),
            prefix_index=prefix_index,
            positions=positions,
            last_layer_fusion=last_layer_fusion,
            pixel_variance=pixel_variance,
            rotary_table=rotary_table,
            kept_indices=[] if output_kept_indices else None,
        )

    def _prune(
        self, block: int, hidden_states: torch.Tensor, attention_probs: torch.Tensor | None, routing: RoutingState
    ) -> torch.Tensor:
        """The tokens the module after `block` keeps: prefix tokens, then the best-scored patches."""
        scores, aux_logits = self.token_selector(block, hidden_states, routing.pixel_variance, attention_probs)
        if aux_logits is not None:
            routing.aux_logits.append(aux_logits)
        num_keep = routing.keep_counts[block]
        if num_keep < hidden_states.shape[1] - self.num_prefix_tokens:
            hidden_states = routing.keep(hidden_states, *rank_tokens(scores, num_keep, routing.prefix_index))
        if routing.kept_indices is not None:
            routing.kept_indices.append(routing.positions)
        return hidden_states


# ----------------------------------------------------------------------------------------------------------------------
# Losses shared by the heads
# ----------------------------------------------------------------------------------------------------------------------
def resolve_problem_type(config: CroprViTConfig, labels: torch.Tensor) -> str:
    """transformers' rule: regression for one label, single-label for integer labels, else multi-label.

    Does not set `config.problem_type`: the head records it only once the labels passed their checks, so that one
    call with bad labels cannot change how every later call reads its labels.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def check_classification_labels(labels: torch.Tensor, problem_type: str, num_labels: int, batch_size: int) -> None:
    """Reject labels the loss would misread or crash on, naming what was expected.

    The value checks read the labels on the host: they run only when a loss is computed, never on the inference
    path.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.dim() == 0:
        raise ValueError(f"`labels` must have one row per image ({batch_size}), got a 0-dimensional tensor.")
    if labels.shape[0] != batch_size:
        raise ValueError(f"`labels` has {labels.shape[0]} rows but the batch has {batch_size} images.")
    if problem_type == "single_label_classification":
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"single-label `labels` must be integer class ids of shape ({batch_size},), got dtype {labels.dtype} "
                f"and shape {tuple(labels.shape)}; multi-hot float labels need `problem_type="
                '"multi_label_classification"` (or `CroprViTForMultiLabelClassification`).'
            )
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_labels:
            raise ValueError(f"`labels` must be class ids in [0, {num_labels - 1}], got values in [{low}, {high}].")
    elif problem_type == "multi_label_classification":
        if tuple(labels.shape) != (batch_size, num_labels):
            hint = " (class ids for single-label classification must be an integer tensor)" if labels.dim() == 1 else ""
            raise ValueError(
                f"multi-label `labels` must be multi-hot of shape ({batch_size}, {num_labels}), got "
                f"{tuple(labels.shape)}{hint}."
            )
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("multi-label `labels` must be multi-hot (every value 0 or 1).")
    elif tuple(labels.shape) != (batch_size, num_labels) and (num_labels != 1 or labels.dim() != 1):
        one_dimensional = f"({batch_size},) or " if num_labels == 1 else ""
        raise ValueError(
            f"regression `labels` must have shape {one_dimensional}({batch_size}, {num_labels}), got "
            f"{tuple(labels.shape)}."
        )


def check_segmentation_labels(
    labels: torch.Tensor, pixel_values: torch.Tensor, num_labels: int, ignore_index: int
) -> None:
    """Segmentation maps must be integer class ids (or the ignore index) of the images' size."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    batch_size, _, height, width = pixel_values.shape
    if tuple(labels.shape) != (batch_size, height, width):
        raise ValueError(
            f"segmentation `labels` must have shape (batch, height, width) = ({batch_size}, {height}, {width}) like "
            f"the images, got {tuple(labels.shape)}; resize the maps with nearest-neighbour (the image processor "
            "does this when given `segmentation_maps`)."
        )
    if labels.is_floating_point():
        raise ValueError(f"segmentation `labels` must hold integer class ids, got dtype {labels.dtype}.")
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= num_labels))
    if bool(invalid.any()):
        bad = sorted(set(labels[invalid].unique()[:5].tolist()))
        raise ValueError(
            f"segmentation `labels` must be class ids in [0, {num_labels - 1}] or the ignore index {ignore_index}, "
            f"got {bad}."
        )


def classification_loss(
    loss_function: Callable, logits: torch.Tensor, labels: torch.Tensor, config: CroprViTConfig
) -> torch.Tensor:
    """`loss_function` (transformers' image-classification loss, by `config.problem_type`) in float32, on `(B, C)`
    logits (main head) or `(B, 1, C)` logits (an auxiliary head: image-level heads have one query per module)."""
    if logits.dim() == 3:
        logits = logits[:, 0]
    labels = labels.long() if config.problem_type == "single_label_classification" else labels.float()
    return loss_function(labels, logits.float(), config)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy averaged over the labels that are not `ignore_index`, and 0 (not NaN, as `F.cross_entropy`
    gives) when every label is ignored, so that such a batch leaves the weights as they are."""
    summed = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return summed / (labels != ignore_index).sum().clamp(min=1)


def total_loss(main_loss: torch.Tensor, aux_loss: torch.Tensor | None, weight: float) -> torch.Tensor:
    return main_loss if aux_loss is None else main_loss + weight * aux_loss


def sum_aux_losses(aux_logits: tuple[torch.Tensor, ...] | None, loss_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Unweighted sum over Cropr modules, as the reference implementation (None outside training)."""
    if not aux_logits:
        return None
    return torch.stack([loss_fn(logits) for logits in aux_logits]).sum()


# ----------------------------------------------------------------------------------------------------------------------
# Task heads
# ----------------------------------------------------------------------------------------------------------------------
class CroprViTForImageClassification(CroprViTPreTrainedModel):
    """CroprViT with LayerNorm + Linear on the pooled tokens; one Cropr auxiliary head per module.

    The loss follows `config.problem_type` with transformers' image-classification loss (as ViT): softmax
    cross-entropy (single-label), sigmoid + BCE (multi-label) or MSE (regression), for the main head and every
    auxiliary head alike.
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cropr_vit = CroprViTModel(config)
        self.classifier = CroprClassificationHead(
            config.pooled_size, config.num_labels, config.layer_norm_eps, use_norm=config.classifier_norm
        )
        # The multi-label head's class name matches none of transformers' losses; it shares this one.
        self.loss_type = "ForImageClassification"
        self.post_init()

    def _check_task_config(self, config: CroprViTConfig) -> None:
        if config.token_selector in LEARNED_SELECTORS and config.num_queries != 1:
            raise ValueError(
                f"Image-level heads use one query per Cropr module (`num_queries=1`), got {config.num_queries}."
            )
        if config.aux_ignored_labels:
            raise ValueError(
                "`aux_ignored_labels` applies to the per-patch auxiliary loss of semantic segmentation only; "
                f"got {list(config.aux_ignored_labels)} for an image-level head."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_kept_indices: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CroprViTImageClassifierOutput:
        r"""
        labels (`torch.Tensor`, *optional*):
            Per `config.problem_type` (inferred as in transformers when unset): class ids `(batch_size,)`, multi-hot
            `(batch_size, num_labels)`, or regression targets.
        """
        self.check_config()
        outputs = self.cropr_vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_kept_indices=output_kept_indices,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = aux_loss = None
        if labels is not None:
            loss, aux_loss = self._losses(labels, logits, outputs.aux_logits)
        return CroprViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            aux_loss=aux_loss,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kept_indices=outputs.kept_indices,
            aux_logits=outputs.aux_logits,
        )

    def _losses(
        self, labels: torch.Tensor, logits: torch.Tensor, aux_logits: tuple[torch.Tensor, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(total loss, auxiliary loss) once the labels passed their checks; the problem type is then recorded."""
        problem_type = resolve_problem_type(self.config, labels)
        check_classification_labels(labels, problem_type, self.num_labels, logits.shape[0])
        self.config.problem_type = problem_type
        labels = labels.to(logits.device)
        main_loss = classification_loss(self.loss_function, logits, labels, self.config)
        aux_loss = sum_aux_losses(
            aux_logits,
            lambda module_logits: classification_loss(self.loss_function, module_logits, labels, self.config),
        )
        return total_loss(main_loss, aux_loss, self.config.aux_loss_weight), aux_loss


class CroprViTForMultiLabelClassification(CroprViTForImageClassification):
    """Image classification with independent sigmoid outputs (the paper's detection proxy): multi-hot labels, BCE for
    the main and auxiliary heads. `problem_type` defaults to `"multi_label_classification"`, which saved checkpoints
    carry, so `pipeline("image-classification")` reports sigmoid scores."""

    def __init__(self, config: CroprViTConfig):
        if config.problem_type is None:
            # On a copy: the caller's config may go on to build a single-label head.
            config = copy.deepcopy(config)
            config.problem_type = "multi_label_classification"
        elif config.problem_type != "multi_label_classification":
            warnings.warn(
                f"CroprViTForMultiLabelClassification built with `problem_type={config.problem_type!r}` computes that "
                "problem's loss, as CroprViTForImageClassification does; for sigmoid outputs pass "
                '`problem_type="multi_label_classification"` (e.g. to `from_pretrained`).',
                UserWarning,
                stacklevel=2,
            )
        super().__init__(config)


class CroprViTForSemanticSegmentation(CroprViTPreTrainedModel):
    """Segmenter linear head: LayerNorm + Linear per patch token, logits at patch resolution `(B, C, h, w)`.

    The main loss compares logits upsampled (bilinear) to the label size; each Cropr module has one query per patch
    (raster order) whose aggregated token predicts that patch's label, taken from the labels downsampled by nearest.
    `config.semantic_loss_ignore_index` is ignored by both losses, `config.aux_ignored_labels` by the auxiliary one.
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cropr_vit = CroprViTModel(config)
        self.decode_head = CroprClassificationHead(config.hidden_size, config.num_labels, config.layer_norm_eps)
        self.post_init()

    def _check_task_config(self, config: CroprViTConfig) -> None:
        if config.pruning_blocks and not config.last_layer_fusion:
            raise ValueError(
                "Semantic segmentation needs every token at the output: set `last_layer_fusion=True` "
                '(or `token_selector="none"`).'
            )
        if config.token_selector in LEARNED_SELECTORS and config.num_queries != config.num_patches:
            raise ValueError(
                f"Segmentation Cropr modules need one query per patch: set `num_queries={config.num_patches}` "
                f"({config.patch_grid[0]}x{config.patch_grid[1]} patches), got {config.num_queries}."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_kept_indices: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CroprViTSemanticSegmenterOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Class id of each pixel, or `config.semantic_loss_ignore_index`.
        """
        self.check_config()
        outputs = self.cropr_vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_kept_indices=output_kept_indices,
            return_dict=True,
            **kwargs,
        )
        patch_h, patch_w = self.config.patch_size_hw
        grid_h, grid_w = pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w
        patch_tokens = outputs.last_hidden_state[:, self.config.num_prefix_tokens :]
        logits = self.decode_head(patch_tokens).transpose(1, 2).reshape(-1, self.num_labels, grid_h, grid_w)
        loss = aux_loss = None
        if labels is not None:
            loss, aux_loss = self._losses(labels, logits, outputs.aux_logits, pixel_values)
        return CroprViTSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            kept_indices=outputs.kept_indices,
            aux_logits=outputs.aux_logits,
        )

    def _losses(
        self,
        labels: torch.Tensor,
        logits: torch.Tensor,
        aux_logits: tuple[torch.Tensor, ...] | None,
        pixel_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(total loss, auxiliary loss) once the label maps passed their checks."""
        ignore_index = self.config.semantic_loss_ignore_index
        check_segmentation_labels(labels, pixel_values, self.num_labels, ignore_index)
        labels = labels.to(logits.device).long()
        upsampled = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        main_loss = masked_cross_entropy(upsampled, labels, ignore_index)
        aux_loss = None
        if aux_logits:
            patch_labels = self._patch_labels(labels, logits.shape[-2:], aux_logits[0].shape[1], pixel_values)
            aux_loss = sum_aux_losses(
                aux_logits,
                lambda module_logits: masked_cross_entropy(
                    module_logits.float().flatten(0, 1), patch_labels, ignore_index
                ),
            )
        return total_loss(main_loss, aux_loss, self.config.aux_loss_weight), aux_loss

    def _patch_labels(
        self, labels: torch.Tensor, grid: torch.Size, num_queries: int, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Each patch's label for its query (nearest), flattened; `aux_ignored_labels` become the ignore index."""
        if num_queries != grid[0] * grid[1]:
            raise ValueError(
                f"Training the segmentation Cropr modules needs images of the configured size "
                f"{self.config.image_size_hw} (one query per patch); got {tuple(pixel_values.shape[-2:])}."
            )
        patch_labels = F.interpolate(labels[:, None].float(), size=tuple(grid), mode="nearest").long().flatten()
        if self.config.aux_ignored_labels:
            ignored = torch.tensor(self.config.aux_ignored_labels, device=patch_labels.device)
            ignore_index = self.config.semantic_loss_ignore_index
            patch_labels = patch_labels.masked_fill(torch.isin(patch_labels, ignored), ignore_index)
        return patch_labels


# ----------------------------------------------------------------------------------------------------------------------
# Backbone for transformers' detection, segmentation and depth heads
# ----------------------------------------------------------------------------------------------------------------------
class CroprViTBackbone(BackboneMixin, CroprViTModel):
    """CroprViT as a transformers backbone (`AutoBackbone`), for heads built with `backbone_config=CroprViTConfig(...)`
    (DETR, Mask2Former, UperNet, DPT / Depth Anything), as `Dinov2Backbone`.

    Returns one feature map per stage of `config.out_features` (`"stem"`, `"stage1"` ... `"stageL"`). A stage after a
    pruning block is still a full grid: every position holds its token's latest features, the current ones for kept
    tokens, and for set-aside tokens the ones they had when they were set aside (what Last Layer Fusion restores
    before the last block). With `token_selector="none"` the maps equal `Dinov2Backbone`'s for converted weights.

    The Cropr modules learn from their auxiliary heads only (their inputs are detached), whose logits the output
    carries in training (`aux_logits`); the heads of transformers drop them, so a training loop adds
    `aux_loss_weight * backbone.auxiliary_loss(outputs.aux_logits, class_labels)` to the head's loss: the auxiliary
    target is the multi-hot set of the classes of the objects in each image (the backbone config's `num_labels` is
    the number of object classes).
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CroprViTBackboneOutput:
        r"""
        interpolate_pos_encoding (`bool`, *optional*, defaults to `config.interpolate_pos_encoding`):
            Accept images of another size than `config.image_size` (detection processors resize to varying sizes).
        """
        # `BackboneMixin.forward` comes first in the MRO and only raises.
        outputs = CroprViTModel.forward(
            self, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, output_kept_indices=True, **kwargs
        )
        wanted = {self.stage_names.index(stage) for stage in self.out_features}
        grids = self._full_grids(outputs.hidden_states, outputs.kept_indices, wanted)
        patch_h, patch_w = self.config.patch_size_hw
        grid_h, grid_w = pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w
        feature_maps = ()
        for stage in sorted(wanted):
            feature_map = grids[stage]
            if self.config.apply_layernorm:
                feature_map = self.layernorm(feature_map)
            if self.config.reshape_hidden_states:
                feature_map = feature_map[:, self.num_prefix_tokens :].reshape(feature_map.shape[0], grid_h, grid_w, -1)
                feature_map = feature_map.permute(0, 3, 1, 2).contiguous()
            feature_maps += (feature_map,)
        return CroprViTBackboneOutput(
            feature_maps=feature_maps,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_logits=outputs.aux_logits,
        )

    def _full_grids(
        self, hidden_states: tuple[torch.Tensor, ...], kept_indices: tuple[torch.Tensor, ...], stages: set[int]
    ) -> dict[int, torch.Tensor]:
        """The full token map in raster order of each of `stages` (0 = the embeddings, k = block k's output).

        The map is rewritten with the current tokens at every pruning block (whose output still holds the tokens it is
        about to set aside) and at every stage asked for, so set-aside positions keep the features they last had.
        """
        grid = hidden_states[0]
        grids = {0: grid}
        positions = None
        module_positions = iter(kept_indices)
        for block in range(max(stages)):
            tokens = hidden_states[block + 1]
            if positions is None or tokens.shape[1] == grid.shape[1]:
                # Nothing pruned yet, or Last Layer Fusion's last block, which runs on the raster-ordered map.
                grid = tokens
            elif block in self.pruning_blocks or block + 1 in stages:
                grid = write_tokens(grid, tokens, positions)
            grids[block + 1] = grid
            if block in self.pruning_blocks:
                positions = next(module_positions)
        return {stage: grids[stage] for stage in stages}

    def auxiliary_loss(
        self, aux_logits: tuple[torch.Tensor, ...] | None, class_labels: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """Sum over the Cropr modules of the sigmoid BCE between every query's auxiliary logits and the multi-hot
        classes of the objects in its image (`class_labels`: one tensor of class ids per image, as the
        `class_labels` of DETR's or Mask2Former's labels); `None` outside training (no auxiliary logits)."""
        if not aux_logits:
            return None
        if len(class_labels) != aux_logits[0].shape[0]:
            raise ValueError(
                f"`class_labels` has {len(class_labels)} entries but the batch has {aux_logits[0].shape[0]} images."
            )
        num_labels = self.config.num_labels
        targets = torch.zeros(len(class_labels), num_labels, device=aux_logits[0].device)
        for image, labels in enumerate(class_labels):
            labels = torch.as_tensor(labels, device=targets.device).long()
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
                raise ValueError(
                    f"`class_labels` must be class ids in [0, {num_labels - 1}] (the backbone config's `num_labels`), "
                    f"got {sorted(set(labels.tolist()))} for image {image}."
                )
            targets[image, labels] = 1.0
        return sum_aux_losses(
            aux_logits,
            lambda logits: F.binary_cross_entropy_with_logits(
                logits.float(), targets.unsqueeze(1).expand(-1, logits.shape[1], -1)
            ),
        )


__all__ = [
    "CroprViTBackbone",
    "CroprViTBackboneOutput",
    "CroprViTForImageClassification",
    "CroprViTForMultiLabelClassification",
    "CroprViTForSemanticSegmentation",
    "CroprViTModel",
    "CroprViTPreTrainedModel",
    "CroprViTModelOutput",
    "CroprViTImageClassifierOutput",
    "CroprViTSemanticSegmenterOutput",
]
