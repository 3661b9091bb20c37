"""A linear read-out of patch contrast from each Cropr module's tokens: the second scorer that calibration weighs.

The variance selector ranks patches by how much their pixels vary, which keeps edges and texture; it needs the
pixels and sees nothing of what the network computed. A Cropr module can learn a linear scorer that reads the same
signal from its block's tokens, where context sharpens it: per module, a ridge regression of each image's patch
ranks by pixel variance on the patch tokens (both centred per image, since only the order within an image counts).
The sums it needs are gathered on the unpruned forward passes that calibration runs anyway, so it costs no extra
pass; [`calibrate`](cropr.calibration.calibrate) then mixes it with the query learned through the auxiliary heads and
keeps the mix whose pruning changes the fewest of the unpruned model's predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .models.cropr_vit.routing_cropr_vit import patch_pixel_variance

RIDGE = 1e-2
"""Ridge penalty, relative to the mean variance of the token features (scale-free across models)."""


class ContrastReadout:
    """Running sums for one ridge regression per Cropr module (after block `b`, key `str(b)`), in float64."""

    def __init__(self, blocks: Iterable[str], hidden_size: int, num_prefix_tokens: int, patch_size: tuple[int, int]):
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_size = patch_size
        self.gram = {block: torch.zeros(hidden_size, hidden_size, dtype=torch.float64) for block in blocks}
        self.moment = {block: torch.zeros(hidden_size, dtype=torch.float64) for block in blocks}
        self.count = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def accumulate(self, hidden_states: Sequence[torch.Tensor], pixel_values: torch.Tensor) -> None:
        """Add one batch: `hidden_states` of an unpruned forward pass (embeddings first, then each block's output)
        and the pixels it ran on."""
        ranks = patch_pixel_variance(pixel_values, self.patch_size).argsort(dim=1).argsort(dim=1).double()
        ranks = ranks / ranks.shape[1]
        ranks = (ranks - ranks.mean(dim=1, keepdim=True)).flatten()
        # The products run on the model's device; only their (D, D) and (D,) results move to the sums.
        for block in self.gram:
            tokens = hidden_states[int(block) + 1][:, self.num_prefix_tokens :].double()
            tokens = (tokens - tokens.mean(dim=1, keepdim=True)).flatten(0, 1)
            self.gram[block] += (tokens.T @ tokens).cpu()
            self.moment[block] += (tokens.T @ ranks.to(tokens.device)).cpu()
        self.count += ranks.numel()

    def queries(self) -> dict[str, torch.Tensor]:
        """The fitted scorer of each module (zeros before any batch, or when no patch varied)."""
        queries = {}
        for block, gram in self.gram.items():
            penalty = RIDGE * gram.diagonal().mean().clamp(min=torch.finfo(gram.dtype).tiny)
            queries[block] = torch.linalg.solve(
                gram + penalty * torch.eye(len(gram), dtype=gram.dtype), self.moment[block]
            )
        return queries

    def score_spread(self, block: str, query: torch.Tensor) -> float:
        """Standard deviation of `query`'s scores over the module's tokens around each image's mean, so that two
        scorers can be mixed on a common scale."""
        covariance = self.gram[block] / self.count.clamp(min=1)
        query = query.double().cpu()
        return float((query @ covariance @ query).clamp(min=0).sqrt())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The sums, to save with an interrupted calibration."""
        tensors = {"count": self.count}
        for block in self.gram:
            tensors[f"gram.{block}"] = self.gram[block]
            tensors[f"moment.{block}"] = self.moment[block]
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.count = tensors["count"].clone()
        for block in self.gram:
            self.gram[block] = tensors[f"gram.{block}"].clone()
            self.moment[block] = tensors[f"moment.{block}"].clone()


def mixed_query(
    learned: torch.Tensor, contrast: torch.Tensor, weight: float, spreads: tuple[float, float]
) -> torch.Tensor:
    """`(1 - weight)` of the learned query plus `weight` of the contrast read-out, each divided by its score
    spread; a scorer with no spread (nothing learned or no contrast) counts as zero. A weight of 0 is the learned
    query itself, unscaled."""
    if weight == 0.0:
        return learned.clone()
    mixed = torch.zeros(learned.shape, dtype=torch.float64)
    for query, share, spread in ((learned, 1.0 - weight, spreads[0]), (contrast, weight, spreads[1])):
        if share > 0 and spread > 0:
            mixed += share * query.double().cpu() / spread
    return mixed.to(learned)
