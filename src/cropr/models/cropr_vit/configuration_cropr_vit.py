"""CroprViT model configuration: a ViT backbone plus a Token Cropr pruning schedule."""

import copy
import dataclasses
import difflib
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneConfigMixin

TOKEN_SELECTORS = ("cropr", "random", "variance", "attention", "non_salient", "none")
LEARNED_SELECTORS = ("cropr", "non_salient")
POOLING_MODES = ("avg", "cls", "cls_patch_mean", "cls_distillation", "patch_mean", "map")
POSITION_EMBEDDING_TYPES = ("absolute", "rope")
# Poolings that concatenate two tokens: the pooled output, and the input of the classification head, is 2 x hidden_size.
CONCATENATING_POOLINGS = ("cls_patch_mean", "cls_distillation")
FINAL_LAYERNORM_MODES = ("tokens", "pooled", "none")

# Fields the modules of a CroprViT model are built from: shapes, which modules exist, dropout and drop-path rates, the
# selector with its schedule and pooling, the label count of the heads. Changed on the config of a built model, the
# model would compute, and save weights for, a network that its config no longer describes, so models refuse it.
STRUCTURAL_FIELDS = (
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "drop_path_rate",
    "use_cls_token",
    "layerscale_value",
    "num_register_tokens",
    "use_distillation_token",
    "position_embedding_type",
    "use_gated_mlp",
    "classifier_norm",
    "pruning_rate",
    "pruning_schedule",
    "router_blocks",
    "last_layer_fusion",
    "token_selector",
    "num_queries",
    "aggregator_mlp",
    "pooling",
    "inference_only",
    "num_labels",
    "patch_embedding_bias",
    "pre_layernorm",
    "final_layernorm",
)

# Keys that transformers itself passes to, or writes into, every config besides its fields and properties (names
# starting with "_" are its internal ones): never worth a warning.
_TRANSFORMERS_CONFIG_KEYS = frozenset(
    {field.name for field in dataclasses.fields(PreTrainedConfig)}
    | {"attn_implementation", "experts_implementation", "per_layer_config", "auto_map"}
    # `Trainer` writes `use_cache` onto the config of every model it trains, so saved checkpoints carry it.
    | {"use_cache"}
    # The backbone keys (`BackboneConfigMixin`): saved as `out_features` / `out_indices`, `stage_names` derived.
    | {"out_features", "out_indices", "stage_names"}
)


def as_pair(value: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"`{name}` must be an int or a (height, width) pair, got {list(value)}.")
    height, width = value
    return int(height), int(width)


def per_block_schedule(
    depth: int,
    num_patches: int,
    removed_fraction: float,
    last_layer_fusion: bool = True,
    num_modules: int | None = None,
) -> list[int]:
    """Tokens removed after each block by a per-block schedule that sets aside `removed_fraction` of the patches.

    One module after each of the first `num_modules` blocks (default: every block but the last, or the last two with
    Last Layer Fusion); together they remove `round(removed_fraction * num_patches)` patches (at most all but one), as
    evenly as possible, earlier modules taking the remainder. For a pretrained backbone at an arbitrary resolution
    this is easier to choose than R.
    """
    if not 0.0 < removed_fraction < 1.0:
        raise ValueError(f"`removed_fraction` must be in (0, 1), got {removed_fraction}")
    most = depth - (2 if last_layer_fusion else 1)
    if most < 1:
        raise ValueError(f"a per-block schedule needs at least {depth - most + 1} blocks, got {depth}")
    if num_modules is None:
        num_modules = most
    elif not 1 <= num_modules <= most:
        raise ValueError(f"`num_modules` must be from 1 to {most} for {depth} blocks, got {num_modules}")
    total = min(round(removed_fraction * num_patches), num_patches - 1)
    base, extra = divmod(total, num_modules)
    return [base + (module < extra) for module in range(num_modules)] + [0] * (depth - num_modules)


def warn_unknown_config_keys(keys: Iterable[str], consequence: str, only_likely_typos: bool = False) -> None:
    """Warn about each of `keys` that is neither a [`CroprViTConfig`] field nor a standard transformers config key,
    naming the closest field: a misspelled `pruning_rat=3` would otherwise be kept or dropped without a word.

    `only_likely_typos` limits the warnings to keys very close to a field, for key sets that mix config overrides with
    other options (the keyword arguments of `from_pretrained`).
    """
    known = [field.name for field in dataclasses.fields(CroprViTConfig)]
    own = [name for name in known if name in CroprViTConfig.__annotations__]
    candidates = [*own, "num_labels", "id2label", "label2id", "problem_type"]
    for key in keys:
        if key.startswith("_") or key in known or key in _TRANSFORMERS_CONFIG_KEYS or hasattr(PreTrainedConfig, key):
            continue
        closest = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8 if only_likely_typos else 0.6)
        if only_likely_typos and not closest:
            continue
        hint = f"; did you mean `{closest[0]}`?" if closest else "."
        warnings.warn(f"`{key}` is not a CroprViTConfig field: {consequence}{hint}", UserWarning, stacklevel=3)


@strict
class CroprViTConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`CroprViTModel`]: a pre-norm Vision Transformer whose token count shrinks after chosen blocks
    (Token Cropr, CVPR 2025). Defaults describe a ViT-B/16 at 224 px pruning 16 tokens after every block with Last
    Layer Fusion.

    Args:
        image_size (`int` or `tuple[int, int]`, *optional*, defaults to 224):
            The size of each image, or its `(height, width)`.
        patch_size (`int` or `tuple[int, int]`, *optional*, defaults to 16):
            The size of each patch, or its `(height, width)`.
        num_channels (`int`, *optional*, defaults to 3):
            The number of input channels.
        hidden_size (`int`, *optional*, defaults to 768):
            Dimensionality of the tokens; a multiple of `num_attention_heads`.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of Transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads in each block.
        intermediate_size (`int`, *optional*):
            Width of the MLP; `None` means `mlp_ratio * hidden_size`.
        mlp_ratio (`int`, *optional*, defaults to 4):
            MLP width as a multiple of `hidden_size`, used when `intermediate_size` is `None`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            The MLP's activation function.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            The epsilon of the blocks' and the final layer normalizations (> 0).
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query, key and value projections have a bias.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout probability of the attention output and the MLP.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout probability of the attention weights.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic-depth rate of the last block; rates rise linearly from 0 over depth, and the last block gets 0
            when `last_layer_fusion` is on.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of the weights.
        use_cls_token (`bool`, *optional*, defaults to `True`):
            Prepend a CLS token, which every pruning module keeps.
        layerscale_value (`float`, *optional*):
            Initial layer-scale value (DINOv2 backbones); `None` means no layer scale.
        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
            Default of the forward argument of the same name; checkpoints converted from DINOv2 set it, as
            `Dinov2Model` always interpolates. Other resolutions keep the schedule's ratios: on an image of P patches a
            module configured to remove R tokens removes round(R x P / `num_patches`), and at least one patch token
            always stays, so every schedule fits every resolution (`patch_keep_counts(P)` gives the counts). Without
            it, any input size other than `image_size` is an error.
        pruning_rate (`int`, *optional*, defaults to 16):
            Tokens removed by each module of the per-block schedule: one module after every block but the last (or
            the last two with Last Layer Fusion); the first removes one more when a CLS token is present.
        pruning_schedule (`list[int]`, *optional*):
            Explicit tokens removed after each block (one entry per block, 0 = no module there); overrides
            `pruning_rate`, except that `from_pretrained(path, pruning_rate=R)` without a schedule replaces a saved
            one with the per-block schedule of rate R. A stage schedule such as "50 after blocks 6, 12, 18" of a
            24-block model is `[0]*5 + [50] + [0]*5 + [50] + [0]*5 + [50] + [0]*6`.
        router_blocks (`list[int]`, *optional*):
            Blocks followed by a Cropr module (learned selectors); `None` means the blocks the schedule prunes after.
            Set when a model runs a lighter schedule than its modules serve (`set_pruning_rate(0)`, or
            `from_pretrained(path, pruning_rate=0)`), so that the unused modules are kept, saved and available to a
            heavier schedule again. Every block the schedule prunes after must have one.
        last_layer_fusion (`bool`, *optional*, defaults to `True`):
            Restore every set-aside token before the last block, so the output is the full token map in raster order.
        token_selector (`str`, *optional*, defaults to `"cropr"`):
            One of "cropr", "random", "variance", "attention", "non_salient", "none"; "none" disables pruning.
        num_queries (`int`, *optional*, defaults to 1):
            Learned queries per Cropr module; the number of patches for segmentation.
        aux_loss_weight (`float`, *optional*, defaults to 1.0):
            Total loss = main loss + weight x the sum of the modules' auxiliary losses (finite, >= 0).
        aggregator_mlp (`bool`, *optional*, defaults to `True`):
            Residual LayerNorm + MLP on the aggregated tokens (training only).
        pooling (`str`, *optional*, defaults to `"avg"`):
            "avg" (mean over all output tokens, prefix tokens included), "cls", "cls_patch_mean" (the CLS token
            concatenated with the mean of the patch tokens, as `Dinov2ForImageClassification`), "cls_distillation"
            (the CLS token concatenated with the distillation token, DeiT's two heads as one linear layer),
            "patch_mean" (the mean of the patch tokens, as `CLIPForImageClassification`) or "map" (SigLIP's multihead
            attention pooling: a learned probe attends to the output tokens, then a residual LayerNorm + MLP; its
            weights are part of the backbone). The two concatenations give a pooled output of width `2 * hidden_size`.
        inference_only (`bool`, *optional*, defaults to `False`):
            Set by `strip_training_modules()`: the checkpoint has no queries, aggregators or auxiliary heads, only
            each module's aggregated query.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label ignored by the segmentation losses.
        num_register_tokens (`int`, *optional*, defaults to 0):
            Register tokens after the CLS (and distillation) token, as DINOv2 with registers and DINOv3: learned prefix
            tokens without position embedding, never scored or pruned.
        use_distillation_token (`bool`, *optional*, defaults to `False`):
            A distillation token after the CLS token, with its own position embedding (distilled DeiT); never pruned.
        position_embedding_type (`str`, *optional*, defaults to `"absolute"`):
            "absolute" (learned, added to the embeddings) or "rope": DINOv3's 2-D rotary embedding of the queries and
            keys of the patch tokens, from patch-centre coordinates in [-1, 1], so any input size works. Every token
            keeps its own rotation through pruning and Last Layer Fusion; prefix tokens are not rotated.
        rope_theta (`float`, *optional*, defaults to 100.0):
            Base period of the rotary embedding.
        use_gated_mlp (`bool`, *optional*, defaults to `False`):
            Gated MLP (SwiGLU with `hidden_act="silu"`): `fc2(act(gate_proj(x)) * fc1(x))`.
        interpolate_antialias (`bool`, *optional*, defaults to `False`):
            Resize the absolute position embeddings for other input sizes with antialiasing, as DINOv2 with registers.
        classifier_norm (`bool`, *optional*, defaults to `True`):
            Whether the classification head has a LayerNorm before its linear layer; `False` for a head converted from
            a source model, whose classifier is a linear layer on the pooled output.
        aux_ignored_labels (`list[int]`, *optional*):
            Segmentation only: class ids that the Cropr modules' per-patch auxiliary loss ignores too (the main loss
            still learns them). Meant for a dominant background class: trained on it, the per-patch queries learn to
            look at background, and their summed scores keep background patches and drop the objects
            (`docs/results.md`). ADE20k, the paper's benchmark, has no such class: its "other" label is the ignore
            index for both losses.
        patch_embedding_bias (`bool`, *optional*, defaults to `True`):
            Whether the patch embedding has a bias (CLIP's has none).
        pre_layernorm (`bool`, *optional*, defaults to `False`):
            A LayerNorm on the embeddings before the first block (CLIP's `pre_layrnorm`).
        final_layernorm (`str`, *optional*, defaults to `"tokens"`):
            Where the final LayerNorm applies: "tokens" (every output token, as ViT, DINOv2 and SigLIP), "pooled"
            (`pooler_output` only, `last_hidden_state` is the last block's output: CLIP's `post_layernorm`) or "none"
            (no final LayerNorm: a CLIP classifier, whose head reads the last block's output).
        out_features (`list[str]`, *optional*), out_indices (`list[int]`, *optional*):
            [`CroprViTBackbone`] only: the stages whose feature maps it returns, by name (`"stem"` = the embeddings,
            `"stage1"` ... `"stageL"` = the blocks' outputs, `config.stage_names`) or index; defaults to the last
            stage. As transformers' backbones (`Dinov2Config`).
        apply_layernorm (`bool`, *optional*, defaults to `True`):
            [`CroprViTBackbone`] only: apply the final LayerNorm to every returned feature map.
        reshape_hidden_states (`bool`, *optional*, defaults to `True`):
            [`CroprViTBackbone`] only: return feature maps as `(batch_size, hidden_size, height, width)` patch grids;
            `False` gives `(batch_size, num_tokens, hidden_size)` with the CLS token first.

    Example:

    ```python
    >>> from cropr import CroprViTConfig, CroprViTForImageClassification
    >>> config = CroprViTConfig(pruning_rate=16, num_labels=10)
    >>> config.token_counts()[:3], round(config.flop_ceiling(), 2)
    ([197, 180, 164], 1.61)
    >>> model = CroprViTForImageClassification(config)
    ```"""

    model_type = "cropr_vit"
    # Trainer drops these from eval predictions: they are diagnostics, not logits.
    keys_to_ignore_at_inference: ClassVar[list[str]] = [
        "hidden_states",
        "attentions",
        "kept_indices",
        "aux_logits",
        "aux_loss",
    ]

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    mlp_ratio: float | int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    use_cls_token: bool = True
    layerscale_value: float | int | None = None
    interpolate_pos_encoding: bool = False

    pruning_rate: int = 16
    pruning_schedule: list[int] | None = None
    router_blocks: list[int] | None = None
    last_layer_fusion: bool = True
    token_selector: str = "cropr"
    num_queries: int = 1
    aux_loss_weight: float | int = 1.0
    aggregator_mlp: bool = True
    pooling: str = "avg"
    inference_only: bool = False
    semantic_loss_ignore_index: int = 255
    aux_ignored_labels: list[int] | None = None
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True

    # Backbone variants of the pretrained families (DINOv2 with registers, DINOv3, distilled DeiT); the defaults are
    # the plain ViT above, so checkpoints saved without these fields compute as before.
    num_register_tokens: int = 0
    use_distillation_token: bool = False
    position_embedding_type: str = "absolute"
    rope_theta: float | int = 100.0
    use_gated_mlp: bool = False
    interpolate_antialias: bool = False
    classifier_norm: bool = True

    # Vision-tower variants (CLIP, SigLIP); the defaults are the ViT layout.
    patch_embedding_bias: bool = True
    pre_layernorm: bool = False
    final_layernorm: str = "tokens"

    def __post_init__(self, **kwargs):
        # Derived from the depth (saved configs carry it too).
        kwargs.pop("stage_names", None)
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        warn_unknown_config_keys(kwargs, "it is stored on the config, but nothing reads it")
        if self.intermediate_size is None:
            self.intermediate_size = int(self.hidden_size * self.mlp_ratio)
        if isinstance(self.image_size, list):
            self.image_size = list(as_pair(self.image_size, "image_size"))
        if isinstance(self.patch_size, list):
            self.patch_size = list(as_pair(self.patch_size, "patch_size"))
        super().__post_init__(**kwargs)
        # Raised here, not in a strict `validate_*` hook, so that callers get a plain ValueError.
        self.check_values()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PreTrainedConfig.from_dict` that refuses another model's config (transformers only warns), checks the
        values once the overrides (`from_pretrained(path, field=value)`) are applied, and warns about overrides that
        are no field (transformers drops them, or hands them to the model constructor, which refuses them)."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This is a {model_type!r} config, not a {cls.model_type!r} one. To start from a pretrained "
                "backbone (ViT, DeiT, DINOv2, DINOv3, ...), convert it with `cropr.from_backbone(...)` (or "
                "`scripts/convert_backbone.py`)."
            )
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        if "pruning_rate" in kwargs:
            # A rate asked for is the schedule to run (the speed dial), also over a checkpoint saved with an explicit
            # schedule, which would otherwise take precedence and leave the rate unused.
            kwargs.setdefault("pruning_schedule", None)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        config._keep_routers_for_lighter_schedule(config_dict, kwargs)
        config.check_values()
        if return_unused_kwargs:
            # The caller (a model's `from_pretrained`) takes the other keys as its own options.
            warn_unknown_config_keys(unused, "it is not applied to the config", only_likely_typos=True)
            return config, unused
        warn_unknown_config_keys(unused, "the override is ignored")
        return config

    def _keep_routers_for_lighter_schedule(self, saved: dict, overrides: dict) -> None:
        """Set `router_blocks` to the saved config's Cropr modules when `overrides` choose a schedule that prunes
        after fewer of their blocks (the speed dial: `from_pretrained(path, pruning_rate=0)`), so the model keeps
        them. A schedule needing a module the saved config lacks builds the new schedule's modules, as before."""
        changed = [name for name in ("pruning_rate", "pruning_schedule", "last_layer_fusion") if name in overrides]
        if not changed or "router_blocks" in overrides:
            return
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        saved_config = copy.deepcopy(self)
        for name in changed:
            setattr(saved_config, name, saved.get(name, defaults[name]))
        saved_blocks = saved_config.blocks_with_routers
        self.router_blocks = None
        if set(self.pruning_blocks) <= set(saved_blocks) and self.pruning_blocks != saved_blocks:
            self.router_blocks = saved_blocks

    # ----------------------------------------------------------------------------------------------------------
    # Geometry and schedule
    # ----------------------------------------------------------------------------------------------------------
    @property
    def image_size_hw(self) -> tuple[int, int]:
        return as_pair(self.image_size)

    @property
    def patch_size_hw(self) -> tuple[int, int]:
        return as_pair(self.patch_size)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches along height and width at `image_size`."""
        (height, width), (patch_h, patch_w) = self.image_size_hw, self.patch_size_hw
        return height // patch_h, width // patch_w

    @property
    def num_patches(self) -> int:
        grid_h, grid_w = self.patch_grid
        return grid_h * grid_w

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches, never pruned: CLS, distillation and register tokens."""
        return int(self.use_cls_token) + int(self.use_distillation_token) + self.num_register_tokens

    @property
    def num_positioned_prefix_tokens(self) -> int:
        """Prefix tokens that have an absolute position embedding (CLS and distillation token, not registers)."""
        return int(self.use_cls_token) + int(self.use_distillation_token)

    @property
    def pooled_size(self) -> int:
        """Width of `pooler_output`, the input of the classification head."""
        return self.hidden_size * (2 if self.pooling in CONCATENATING_POOLINGS else 1)

    @property
    def effective_pruning_schedule(self) -> list[int]:
        """Tokens removed after each block (one entry per block) at `image_size`: `pruning_schedule` when set,
        otherwise what `pruning_rate` gives, all zeros with `token_selector="none"`."""
        depth = self.num_hidden_layers
        if self.token_selector == "none":
            return [0] * depth
        if self.pruning_schedule is not None:
            return [int(count) for count in self.pruning_schedule]
        num_modules = self.num_per_block_modules
        counts = [self.pruning_rate if block < num_modules else 0 for block in range(depth)]
        if self.use_cls_token and self.pruning_rate > 0 and num_modules > 0:
            counts[0] += 1
        return counts

    @property
    def num_per_block_modules(self) -> int:
        """Modules of the per-block schedule that `pruning_rate` sets: one after every block but the last (the last
        two with Last Layer Fusion)."""
        return max(self.num_hidden_layers - (2 if self.last_layer_fusion else 1), 0)

    def pruning_rate_range(self) -> tuple[int, int] | None:
        """The per-block pruning rates (`from_pretrained(path, pruning_rate=R)`, `set_pruning_rate`) that this model's
        own Cropr modules run, `(0, highest)`; `None` where no rate is: the selector `"none"`, a backbone too shallow
        for a per-block module, or Cropr modules missing after a block that a rate prunes after
        ([`blocks_lacking_rate_modules`])."""
        modules = self.num_per_block_modules
        if self.token_selector == "none" or modules == 0 or self.blocks_lacking_rate_modules():
            return None
        # At rate R the modules remove R tokens each, plus the CLS token's share once (`effective_pruning_schedule`),
        # and one patch must remain (`check_values`).
        return 0, (self.num_patches - 1 - int(self.use_cls_token)) // modules

    def blocks_lacking_rate_modules(self) -> list[int]:
        """Blocks after which every per-block rate above 0 prunes but that have no Cropr module (none for the
        selectors without parameters)."""
        if self.token_selector not in LEARNED_SELECTORS:
            return []
        return sorted(set(range(self.num_per_block_modules)) - set(self.blocks_with_routers))

    def schedule_at_rate(self, pruning_rate: int) -> list[int]:
        """`effective_pruning_schedule` at per-block rate `pruning_rate`, whatever schedule this config has."""
        candidate = copy.deepcopy(self)
        candidate.pruning_schedule = None
        candidate.pruning_rate = pruning_rate
        return candidate.effective_pruning_schedule

    def nearest_pruning_rate(self) -> int | None:
        """The rate of `pruning_rate_range` that removes about as many tokens as this config's schedule (the lower of
        two equally near): its own `pruning_rate` unless an explicit `pruning_schedule` is set; `None` without a
        range."""
        allowed = self.pruning_rate_range()
        if allowed is None:
            return None
        if self.pruning_schedule is None:
            return self.pruning_rate
        removed = sum(self.effective_pruning_schedule)
        rates = range(allowed[0], allowed[1] + 1)
        return min(rates, key=lambda rate: abs(sum(self.schedule_at_rate(rate)) - removed))

    @property
    def pruning_blocks(self) -> list[int]:
        """Indices of the blocks followed by a pruning module."""
        return [block for block, count in enumerate(self.effective_pruning_schedule) if count > 0]

    @property
    def blocks_with_routers(self) -> list[int]:
        """Blocks followed by a Cropr module: `router_blocks`, else the pruning blocks; none for the selectors that
        have no parameters."""
        if self.token_selector not in LEARNED_SELECTORS:
            return []
        return sorted(self.router_blocks) if self.router_blocks is not None else self.pruning_blocks

    def patch_keep_counts(self, num_patches: int | None = None, fraction: float = 1.0) -> list[int]:
        """Patch tokens left after each block's module (CLS not counted).

        `fraction` scales every module's removal (the curriculum that raises R during training). At a resolution
        other than `image_size` (`num_patches` differs) each module removes the same share of the patch tokens as at
        `image_size`, so a schedule always fits: at least one patch token is kept.
        """
        reference = self.num_patches
        # int(): under tracing (legacy ONNX export) the patch count arrives as a tensor; the schedule stays static.
        num_patches = reference if num_patches is None else int(num_patches)
        remaining, counts = num_patches, []
        for removed in self.effective_pruning_schedule:
            if removed:
                scaled = removed * fraction * num_patches / reference
                remaining = max(1, remaining - round(scaled))
            counts.append(remaining)
        return counts

    def token_counts(self, pruned: bool = True) -> list[int]:
        """Tokens (CLS included) that each block sees at `image_size`."""
        tokens = self.num_patches + self.num_prefix_tokens
        counts = []
        for block, removed in enumerate(self.effective_pruning_schedule):
            is_last = block == self.num_hidden_layers - 1
            if pruned and is_last and self.last_layer_fusion:
                tokens = self.num_patches + self.num_prefix_tokens
            counts.append(tokens)
            if pruned:
                tokens -= removed
        return counts

    def block_macs(self, tokens: int) -> int:
        """Multiply-adds of one transformer block on `tokens` tokens (n): 4nD^2 (q, k, v, o projections) + 2n^2D
        (scores and weighted sum) + 2nDI (MLP, 3nDI gated)."""
        width = self.hidden_size
        mlp_per_token = (3 if self.use_gated_mlp else 2) * width * self.intermediate_size
        return 4 * tokens * width**2 + 2 * tokens**2 * width + tokens * mlp_per_token

    def flops(self, pruned: bool = True) -> int:
        """Analytic multiply-adds of the backbone for one image at `image_size`.

        The blocks ([`block_macs`] on each block's tokens), plus the patch embedding, the attention-pooling head
        (`pooling="map"`: key and value projections of the n output tokens 2nD^2, one query's scores and sum 2nD, its
        q and o projections 2D^2 and its MLP, 2DI: a plain MLP even in a gated model, as SigLIP's) and, when pruned,
        one n x D routing product per module.
        """
        width = self.hidden_size
        patch_h, patch_w = self.patch_size_hw
        total = self.num_patches * self.num_channels * patch_h * patch_w * width
        total += sum(self.block_macs(tokens) for tokens in self.token_counts(pruned))
        if pruned:
            counts = self.token_counts(pruned)
            total += sum(counts[block] * width for block in self.pruning_blocks)
        if self.pooling == "map":
            # Nothing is pruned after the last block: the head reads the tokens that block sees.
            tokens = self.token_counts(pruned)[-1]
            total += 2 * tokens * width**2 + 2 * tokens * width + 2 * width**2 + 2 * width * self.intermediate_size
        return total

    def flop_ceiling(self) -> float:
        """Unpruned over pruned multiply-adds: the speedup a perfect implementation would reach."""
        return self.flops(pruned=False) / self.flops(pruned=True)

    # ----------------------------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------------------------
    def check_values(self) -> None:
        """Raise a `ValueError` naming the field and the numbers when a value cannot work.

        The one check of the config's values. It runs when a config is built, after `from_dict` applies overrides,
        and when a model is built from a config or finds its config changed (`CroprViTPreTrainedModel.check_config`,
        at every forward and before saving).
        """
        positive = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "intermediate_size": self.intermediate_size,
            "num_queries": self.num_queries,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"`num_labels` must be >= 1 (`id2label` needs at least one class), got {self.num_labels}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        for name, size in (("image_size", self.image_size_hw), ("patch_size", self.patch_size_hw)):
            if min(size) < 1:
                raise ValueError(f"`{name}` must be positive, got {size}.")
        (height, width), (patch_h, patch_w) = self.image_size_hw, self.patch_size_hw
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"`image_size` {height}x{width} is not divisible by `patch_size` {patch_h}x{patch_w}: "
                f"use e.g. {height - height % patch_h or patch_h}x{width - width % patch_w or patch_w}."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is unknown; choose one of {sorted(ACT2FN)}.")
        if self.token_selector not in TOKEN_SELECTORS:
            raise ValueError(f"`token_selector` must be one of {TOKEN_SELECTORS}, got {self.token_selector!r}.")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"`pooling` must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if self.pooling in ("cls", "cls_patch_mean") and not self.use_cls_token:
            raise ValueError(f'`pooling="{self.pooling}"` needs `use_cls_token=True`.')
        self._check_backbone_variants()
        if self.final_layernorm not in FINAL_LAYERNORM_MODES:
            raise ValueError(f"`final_layernorm` must be one of {FINAL_LAYERNORM_MODES}, got {self.final_layernorm!r}.")
        if not (math.isfinite(self.aux_loss_weight) and self.aux_loss_weight >= 0):
            raise ValueError(f"`aux_loss_weight` must be >= 0 and finite, got {self.aux_loss_weight}.")
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ValueError(f"`layer_norm_eps` must be > 0 and finite, got {self.layer_norm_eps}.")
        if self.pruning_rate < 0:
            raise ValueError(f"`pruning_rate` must be >= 0, got {self.pruning_rate}.")
        self._check_aux_ignored_labels()
        self._check_schedule()
        self._check_router_blocks()

    def check_pruning_rate_is_used(self) -> None:
        """Raise a `ValueError` when a positive `pruning_rate` removes no token.

        For callers given a rate explicitly (conversion, command lines): the config alone cannot tell such a rate
        from the default one, which unpruned or explicitly scheduled configs carry unused.
        """
        if self.pruning_rate == 0:
            return
        if self.token_selector == "none":
            reason = '`token_selector="none"` prunes nothing'
        elif self.pruning_schedule is not None:
            reason = f"`pruning_schedule` {list(self.pruning_schedule)} sets every module's count"
        elif self.num_per_block_modules == 0:
            needed = 3 if self.last_layer_fusion else 2
            reason = (
                f"a {self.num_hidden_layers}-block model has no block for a per-block module (one after every block "
                f"but the last{' two, with `last_layer_fusion`' if self.last_layer_fusion else ''}: it needs at "
                f"least {needed} blocks)"
            )
        else:
            return
        raise ValueError(f"`pruning_rate={self.pruning_rate}` would not be used: {reason}.")

    def _check_backbone_variants(self) -> None:
        if self.num_register_tokens < 0:
            raise ValueError(f"`num_register_tokens` must be >= 0, got {self.num_register_tokens}.")
        if self.use_distillation_token and not self.use_cls_token:
            raise ValueError("`use_distillation_token=True` needs `use_cls_token=True` (DeiT's token order).")
        if self.pooling == "cls_distillation" and not self.use_distillation_token:
            raise ValueError('`pooling="cls_distillation"` needs `use_distillation_token=True`.')
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"`position_embedding_type` must be one of {POSITION_EMBEDDING_TYPES}, got "
                f"{self.position_embedding_type!r}."
            )
        if self.position_embedding_type == "rope":
            head_dim = self.hidden_size // self.num_attention_heads
            if head_dim % 4:
                raise ValueError(
                    '`position_embedding_type="rope"` needs a head width divisible by 4 (two axes, sine and cosine); '
                    f"`hidden_size / num_attention_heads` is {head_dim}."
                )
            if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
                raise ValueError(f"`rope_theta` must be > 0 and finite, got {self.rope_theta}.")

    def _check_aux_ignored_labels(self) -> None:
        if not self.aux_ignored_labels:
            return
        outside = [label for label in self.aux_ignored_labels if not 0 <= label < self.num_labels]
        if outside:
            raise ValueError(
                f"`aux_ignored_labels` must be class ids in [0, {self.num_labels - 1}] (`num_labels` is "
                f"{self.num_labels}), got {outside}."
            )
        if len(set(self.aux_ignored_labels)) >= self.num_labels:
            raise ValueError(
                f"`aux_ignored_labels` {list(self.aux_ignored_labels)} ignores all {self.num_labels} classes: the "
                "Cropr modules would learn nothing."
            )

    def _check_router_blocks(self) -> None:
        if self.router_blocks is None:
            return
        depth = self.num_hidden_layers
        outside = [block for block in self.router_blocks if not 0 <= block < depth - 1]
        if outside or len(set(self.router_blocks)) != len(self.router_blocks):
            raise ValueError(
                f"`router_blocks` must be distinct block indices in [0, {depth - 2}] (no module follows the last "
                f"block), got {list(self.router_blocks)}."
            )
        if self.token_selector not in LEARNED_SELECTORS:
            return
        lacking = sorted(set(self.pruning_blocks) - set(self.router_blocks))
        if lacking:
            raise ValueError(
                f"The pruning schedule {self.effective_pruning_schedule} prunes after blocks {lacking}, which have "
                f"no Cropr module: this model has modules after blocks {sorted(self.router_blocks)} only. Choose a "
                "schedule that prunes only there, or train modules for those blocks (load the checkpoint with "
                "`router_blocks=None` and the new schedule, then fine-tune)."
            )

    def _check_schedule(self) -> None:
        depth = self.num_hidden_layers
        if self.pruning_schedule is not None:
            if len(self.pruning_schedule) != depth:
                raise ValueError(
                    f"`pruning_schedule` needs one entry per block ({depth}), got {len(self.pruning_schedule)}: "
                    f"{list(self.pruning_schedule)}."
                )
            negative = [count for count in self.pruning_schedule if count < 0]
            if negative:
                raise ValueError(f"`pruning_schedule` entries must be >= 0, got {list(self.pruning_schedule)}.")
        counts = self.effective_pruning_schedule
        if counts[-1] > 0:
            raise ValueError(
                f"`pruning_schedule` prunes {counts[-1]} tokens after the last block ({depth - 1}), "
                "where no block follows: set its last entry to 0."
            )
        if self.last_layer_fusion and depth > 1 and counts[-2] > 0:
            raise ValueError(
                f"`pruning_schedule` prunes {counts[-2]} tokens after the penultimate block ({depth - 2}) but "
                "`last_layer_fusion` restores every token before the last block: set that entry to 0."
            )
        removed, available = sum(counts), self.num_patches - 1
        if removed > available:
            raise ValueError(
                f"The pruning schedule removes {removed} tokens ({counts}) but a {self.image_size_hw[0]}x"
                f"{self.image_size_hw[1]} image with `patch_size` {self.patch_size_hw[0]} has "
                f"{self.num_patches} patch tokens (+{self.num_prefix_tokens} prefix); at most {available} can be "
                "removed so that one patch token remains. Lower `pruning_rate` or the `pruning_schedule` entries."
            )


__all__ = [
    "CroprViTConfig",
    "FINAL_LAYERNORM_MODES",
    "LEARNED_SELECTORS",
    "POOLING_MODES",
    "POSITION_EMBEDDING_TYPES",
    "STRUCTURAL_FIELDS",
    "TOKEN_SELECTORS",
    "per_block_schedule",
    "warn_unknown_config_keys",
]
