"""Token routing for CroprViT: the Cropr module, the baseline selectors, Top-K selection and Last Layer Fusion.

Every selector produces one score per token; `rank_tokens` keeps the top-K patch tokens (prefix tokens such as CLS
are always kept) and sets the others aside. `RoutingState` carries one forward pass's routing from module to module,
including the raster-ordered token map in which Last Layer Fusion collects the set-aside tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_cropr_vit import LEARNED_SELECTORS, CroprViTConfig

AUX_HEAD_LAYER_NORM_EPS = 1e-5
AGGREGATOR_LAYER_NORM_EPS = 1e-6


class CroprClassificationHead(nn.Module):
    """LayerNorm + Linear: every head of the model classifies, per image (classification and the image-level Cropr
    modules' auxiliary heads) or per patch (segmentation and its modules' auxiliary heads)."""

    def __init__(self, hidden_size: int, num_outputs: int, layer_norm_eps: float, use_norm: bool = True):
        super().__init__()
        # Without the norm: a source model's classifier, a linear layer on the final LayerNorm's output.
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if use_norm else nn.Identity()
        self.linear = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(hidden_states))


class CroprAggregator(nn.Module):
    """Cross-attention pooling of the tokens into one vector per query (training only).

    The attention logits are the scorer's own Q·Kᵀ, so the aggregator adds no projections: softmax over tokens of
    logits / sqrt(D), weighted sum of the tokens, then a residual LayerNorm + MLP.
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.scaling = config.hidden_size**-0.5
        self.use_mlp = config.aggregator_mlp
        if self.use_mlp:
            self.norm = nn.LayerNorm(config.hidden_size, eps=AGGREGATOR_LAYER_NORM_EPS)
            self.fc1 = nn.Linear(config.hidden_size, 4 * config.hidden_size)
            self.activation_fn = ACT2FN[config.hidden_act]
            self.fc2 = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, attention_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(attention_logits * self.scaling, dim=-1)
        aggregated = weights @ tokens
        if self.use_mlp:
            aggregated = aggregated + self.fc2(self.activation_fn(self.fc1(self.norm(aggregated))))
        return aggregated


class CroprRouter(nn.Module):
    """One Cropr module: scores the current tokens with learned queries.

    Training: the scorer and aggregator read the tokens detached (stop-gradient), so the backbone learns only from
    the main loss and the queries, aggregator and auxiliary head only from the auxiliary loss.
    Inference: since sum_n Q_n·Kᵀ = (sum_n Q_n)·Kᵀ, the scores are one (B, M, D)·(D) product with the aggregated query,
    kept in a buffer that is refreshed whenever the module enters eval mode or loads weights.
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.invert_scores = config.token_selector == "non_salient"
        if config.inference_only:
            self.queries = None
            self.aggregator = None
            self.aux_head = None
        else:
            self.queries = nn.Parameter(torch.empty(config.num_queries, config.hidden_size))
            self.aggregator = CroprAggregator(config)
            self.aux_head = CroprClassificationHead(config.hidden_size, config.num_labels, AUX_HEAD_LAYER_NORM_EPS)
        self.register_buffer("aggregated_query", torch.zeros(config.hidden_size))
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module.refresh_aggregated_query())

    @torch.no_grad()
    def refresh_aggregated_query(self) -> None:
        if self.queries is not None and self.queries.device.type != "meta":
            self.aggregated_query.copy_(self.queries.sum(dim=0))

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.refresh_aggregated_query()
        return self

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns token scores (B, M) and, in training, auxiliary logits (B, num_queries, num_labels)."""
        tokens = hidden_states.detach()
        aux_logits = None
        if self.training and self.queries is not None:
            attention_logits = self.queries @ tokens.transpose(1, 2)
            scores = attention_logits.sum(dim=1)
            aux_logits = self.aux_head(self.aggregator(attention_logits, tokens))
        else:
            # `torch.mv` is not on the CPU autocast's lower-precision list (CUDA's casts it like matmul), so under CPU
            # bf16 autocast the scores keep the residual stream's fp32: no cast of every token (faster there than the
            # bf16 product) and no ties from 8-bit mantissas.
            flat_tokens = tokens.reshape(-1, tokens.shape[-1])
            scores = torch.mv(flat_tokens, self.aggregated_query.to(tokens.dtype)).view(tokens.shape[:-1])
        if self.invert_scores:
            scores = -scores
        return scores, aux_logits


def patch_pixel_variance(pixel_values: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """Variance of each patch's pixels, averaged over channels: (B, num_patches) in raster order."""
    batch_size, channels, height, width = pixel_values.shape
    patch_h, patch_w = patch_size
    grid_h, grid_w = height // patch_h, width // patch_w
    patches = pixel_values[:, :, : grid_h * patch_h, : grid_w * patch_w].float()
    patches = patches.reshape(batch_size, channels, grid_h, patch_h, grid_w, patch_w)
    return patches.var(dim=(3, 5)).mean(dim=1).flatten(1)


def received_attention(attention_probs: torch.Tensor, from_cls_only: bool) -> torch.Tensor:
    """Mean attention each token receives (B, M), over heads and queries, or from the CLS query only."""
    if from_cls_only:
        return attention_probs[:, :, 0, :].mean(dim=1)
    return attention_probs.mean(dim=(1, 2))


class TokenSelector(nn.Module):
    """Scores tokens after each pruning block with the configured selector.

    Holds the Cropr modules (one per pruning block) for the learned selectors; the baselines have no parameters.
    `generator` (a `torch.Generator` on the model's device) makes the random selector reproducible independently of
    the global seed; `None` uses the global RNG.
    """

    def __init__(self, config: CroprViTConfig):
        super().__init__()
        self.selector = config.token_selector
        self.pool_from_cls = config.pooling == "cls"
        self.generator: torch.Generator | None = None
        if self.selector in LEARNED_SELECTORS:
            self.routers = nn.ModuleDict({str(block): CroprRouter(config) for block in config.blocks_with_routers})
        else:
            self.routers = None

    @property
    def needs_pixel_variance(self) -> bool:
        return self.selector == "variance"

    @property
    def needs_attention(self) -> bool:
        return self.selector == "attention"

    def forward(
        self,
        block: int,
        hidden_states: torch.Tensor,
        pixel_variance: torch.Tensor | None,
        attention_probs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B, M) for the tokens after `block`, and the Cropr module's auxiliary logits in training."""
        if self.routers is not None:
            return self.routers[str(block)](hidden_states)
        if self.selector == "random":
            batch_size, num_tokens = hidden_states.shape[:2]
            scores = torch.rand(
                batch_size, num_tokens, generator=self.generator, device=hidden_states.device, dtype=torch.float32
            )
            return scores, None
        if self.selector == "variance":
            return pixel_variance, None
        if self.selector == "attention":
            return received_attention(attention_probs, self.pool_from_cls), None
        raise ValueError(f"token selector {self.selector!r} does not prune")


def _flat_row_index(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, K) per-sample token indices -> (B*K,) row indices into the (B*M, D) flattened tokens."""
    if index.shape[0] == 1:  # batch 1, what pipeline() runs: the rows are the indices themselves
        return index.reshape(-1)
    offsets = torch.arange(0, index.shape[0] * num_tokens, num_tokens, device=index.device)
    return (index + offsets.unsqueeze(1)).flatten()


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, M, D) gathered along M by index (B, K).

    Whole rows are copied with `index_select` on the flattened tokens: an order of magnitude faster on CPU than an
    element-wise `gather` with an index expanded over D.
    """
    batch_size, num_tokens, width = tokens.shape
    rows = tokens.reshape(batch_size * num_tokens, width).index_select(0, _flat_row_index(index, num_tokens))
    return rows.view(batch_size, index.shape[1], width)


def rank_tokens(
    scores: torch.Tensor, num_keep: int, prefix_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a module keeps and what it sets aside: indices (B, P + K) of the prefix tokens `prefix_index` (B, P)
    followed by the `num_keep` best-scored patches by descending score, and (B, M - P - K) of the other patches.

    One sort gives both: they are disjoint even where scores tie (flat background patches under the variance
    selector), and it costs what a `topk` of the kept patches does.
    """
    num_prefix_tokens = 0 if prefix_index is None else prefix_index.shape[1]
    order = scores[:, num_prefix_tokens:].argsort(dim=1, descending=True)
    if num_prefix_tokens:
        order = order + num_prefix_tokens
    keep_patch, set_aside = order[:, :num_keep], order[:, num_keep:]
    if prefix_index is None:
        return keep_patch, set_aside
    return torch.cat([prefix_index, keep_patch], dim=1), set_aside


@dataclasses.dataclass
class RoutingState:
    """What one forward pass carries from pruning module to pruning module.

    num_tokens: the tokens of the embeddings (prefix tokens first: CLS, distillation, registers; then the patches in
        raster order).
    keep_counts: the patch tokens each block's module keeps for this input ([`CroprViTConfig.patch_keep_counts`]).
    prefix_index: `(batch_size, num_prefix_tokens)`, the prefix tokens' indices, which every module keeps in front
        (`None` without prefix tokens).
    positions: `(batch_size, n)`, the position in the embeddings' order of each current token; `None` when nothing
        reads it (no Last Layer Fusion, rotary embeddings or `kept_indices`), so that modules skip its gather.
    last_layer_fusion: whether the last block sees every token ([`fuse_tokens`]).
    token_map: with Last Layer Fusion, the full token map in raster order as `(batch_size * num_tokens, hidden)`
        rows: each pruning module writes the tokens it sets aside at their positions, so a set-aside token's row
        holds its state when it was set aside, and [`fuse_tokens`] writes the kept ones last. The last block then
        runs on the map itself: no concatenation, no restoring of the order afterwards (attention does not depend on
        the order of the tokens).
    pixel_variance: `(batch_size, n)`, the variance selector's scores of the current tokens (`None` for the others).
    kept_indices: `positions` after each module, when they are to be returned.
    aux_logits: each Cropr module's auxiliary logits (training).
    rotary_table: with rotary position embeddings, the cosines and sines `(num_tokens, head_dim)` of every position
        ([`rotary_position_table`]); `rotary` holds those of the current tokens, gathered with `positions` whenever
        they change, so that every token keeps its own rotation through Top-K and Last Layer Fusion.
    """

    num_tokens: int
    keep_counts: list[int]
    prefix_index: torch.Tensor | None
    positions: torch.Tensor | None
    last_layer_fusion: bool
    token_map: torch.Tensor | None = None
    pixel_variance: torch.Tensor | None = None
    kept_indices: list[torch.Tensor] | None = None
    aux_logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self):
        self._rotary_in_raster_order()

    def _rotary_in_raster_order(self) -> None:
        if self.rotary_table is not None:
            # Every token is in its place: the table itself, broadcast over the batch.
            self.rotary = tuple(table.unsqueeze(0) for table in self.rotary_table)

    def _write_token_map(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Write `tokens` (B, K, D) into `token_map` at their raster `positions` (B, K)."""
        width = tokens.shape[-1]
        if self.token_map is None:
            # Every row is written exactly once: by the module that sets its token aside, or by the fusion.
            self.token_map = tokens.new_empty(tokens.shape[0] * self.num_tokens, width)
        self.token_map.index_copy_(0, _flat_row_index(positions, self.num_tokens), tokens.reshape(-1, width))

    def keep(
        self, hidden_states: torch.Tensor, keep_index: torch.Tensor, set_aside_index: torch.Tensor
    ) -> torch.Tensor:
        """The tokens at `keep_index` (see [`rank_tokens`]); with Last Layer Fusion those at `set_aside_index` wait
        in `token_map`."""
        if self.last_layer_fusion:
            self._write_token_map(
                gather_tokens(hidden_states, set_aside_index), self.positions.gather(1, set_aside_index)
            )
        hidden_states = gather_tokens(hidden_states, keep_index)
        if self.positions is not None:
            self.positions = self.positions.gather(1, keep_index)
            if self.rotary_table is not None:
                self.rotary = tuple(table[self.positions] for table in self.rotary_table)
        if self.pixel_variance is not None:
            self.pixel_variance = self.pixel_variance.gather(1, keep_index)
        return hidden_states

    def fuse_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Last Layer Fusion: every token in raster order, the kept ones in their current state and each set-aside
        one in the state it had when set aside; `rotary` follows."""
        self._write_token_map(hidden_states, self.positions)
        self._rotary_in_raster_order()
        return self.token_map.view(hidden_states.shape[0], self.num_tokens, hidden_states.shape[-1])


def write_tokens(grid: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy of the full token map `grid` (B, N, D) with `tokens` (B, M, D) written at `positions` (B, M), out of
    place so that gradients reach both (a backbone's feature map after a pruning block)."""
    batch_size, num_tokens, width = grid.shape
    rows = grid.reshape(batch_size * num_tokens, width)
    rows = rows.index_copy(0, _flat_row_index(positions, num_tokens), tokens.reshape(-1, width))
    return rows.view(batch_size, num_tokens, width)


__all__ = [
    "CroprAggregator",
    "CroprClassificationHead",
    "CroprRouter",
    "RoutingState",
    "TokenSelector",
    "gather_tokens",
    "patch_pixel_variance",
    "received_attention",
    "rank_tokens",
    "write_tokens",
]
