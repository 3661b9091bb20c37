"""Where the time of a pruned forward goes: one transformer block timed at each token count the model runs it at.

The FLOP ceiling assumes that a block's time is proportional to its multiply-adds. A block also has costs that do not
shrink with its tokens: each call reads all of its weights, whatever the number of tokens (at batch 1 and short
sequences the matrix products wait on that read more than on arithmetic), autocast casts those weights again on every
call, and every op has a fixed launch cost. The fewer tokens a block keeps, the larger their share, so a pruned model
cannot reach the FLOP ceiling however cheap its routing is.

[`measure_block_scaling`] times one block, interleaved, at every token count of the unpruned and the pruned schedule,
and fits `time = fixed + per_mac * block_macs(n)` over them. Summing the measured times over the schedule gives the
speedup the blocks alone allow on this machine, the same quantity the benchmark's `ideal` variant measures with the
embedding, the final norm and the pooling included.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..models.cropr_vit.configuration_cropr_vit import CroprViTConfig
from ..models.cropr_vit.modeling_cropr_vit import CroprViTLayer
from .timing import interleaved_timings


def measure_block_scaling(
    block: CroprViTLayer,
    config: CroprViTConfig,
    batch_size: int,
    autocast: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 7,
    min_time: float = 0.0,
    clock: str = "wall",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median time of `block` at each token count of `config`'s unpruned and pruned schedules, and what they add up to.

    Args:
        block: one eval-mode block of the model (every block of a CroprViT has the same shape); rotary position
            embeddings, where the config has them, are left out, so the timed block is a plain one.
        config: the pruned model's config: its `token_counts()` give the sequence lengths.
        batch_size: images per call.
        autocast: returns a fresh autocast context (or a null context) entered around every call, as the model
            would be run.
        warmup, repeats, min_time, clock, progress: as for [`interleaved_timings`].

    Returns:
        `block_ms` (median ms per call at each token count, longest first), the fit `fixed_ms` + `ms_per_gmac` (and its
        `fixed_share` of the unpruned block's time), `weight_mb` (the block's parameters in their stored dtype),
        `blocks_speedup` (the unpruned schedule's summed block time over the pruned one's) and `blocks_flop_ceiling`
        (the same ratio of block multiply-adds).
    """
    unpruned, pruned = config.token_counts(pruned=False), config.token_counts(pruned=True)
    counts = sorted(set(unpruned) | set(pruned), reverse=True)
    parameter = next(block.parameters())
    generator = torch.Generator().manual_seed(0)
    inputs = {
        tokens: torch.randn(batch_size, tokens, config.hidden_size, generator=generator).to(parameter.device)
        for tokens in counts
    }

    def step_at(tokens: int) -> Callable[[], Any]:
        def step() -> Any:
            with torch.inference_mode(), autocast():
                return block(inputs[tokens])

        return step

    samples = interleaved_timings(
        {f"n={tokens}": step_at(tokens) for tokens in counts},
        parameter.device,
        warmup,
        repeats,
        min_time,
        progress,
        clock,
    )
    seconds = {tokens: statistics.median(samples[f"n={tokens}"]) for tokens in counts}
    gmacs = [batch_size * config.block_macs(tokens) / 1e9 for tokens in counts]
    if len(counts) > 1:
        ms_per_gmac, fixed_ms = statistics.linear_regression(gmacs, [seconds[tokens] * 1e3 for tokens in counts])
    else:  # an unpruned schedule: one length, nothing to fit
        ms_per_gmac, fixed_ms = seconds[counts[0]] * 1e3 / gmacs[0], 0.0
    return {
        "batch_size": batch_size,
        "block_ms": {str(tokens): seconds[tokens] * 1e3 for tokens in counts},
        "fixed_ms": fixed_ms,
        "ms_per_gmac": ms_per_gmac,
        "fixed_share": fixed_ms / (seconds[unpruned[0]] * 1e3),
        "weight_mb": sum(p.numel() * p.element_size() for p in block.parameters()) / 1e6,
        "blocks_speedup": sum(seconds[n] for n in unpruned) / sum(seconds[n] for n in pruned),
        "blocks_flop_ceiling": sum(map(config.block_macs, unpruned)) / sum(map(config.block_macs, pruned)),
    }


def format_block_scaling(dtype_name: str, result: dict[str, Any]) -> list[str]:
    """Report lines for one dtype and batch size of [`measure_block_scaling`]."""
    times = ", ".join(f"{tokens} {ms:.2f}" for tokens, ms in result["block_ms"].items())
    allowed = result["blocks_speedup"]
    ceiling = result["blocks_flop_ceiling"]
    return [
        f"{dtype_name:<5} batch {result['batch_size']}: ms per call at n tokens: {times}",
        f"      fit: {result['fixed_ms']:.2f} ms fixed ({result['fixed_share']:.1%} of the unpruned block; its "
        f"weights are {result['weight_mb']:.1f} MB) + {result['ms_per_gmac']:.2f} ms/GMAC; the blocks allow "
        f"{allowed:.3f}x of their {ceiling:.3f}x FLOP ceiling ({allowed / ceiling:.3f})",
    ]
