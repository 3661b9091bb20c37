"""Where the time of a pruned forward goes: the model's blocks timed at each token count the model runs them at.

The FLOP ceiling assumes that a block's time is proportional to its multiply-adds. A block also has costs that do not
shrink with its tokens: each call reads all of its weights, whatever the number of tokens (at batch 1 and short
sequences the matrix products wait on that read more than on arithmetic), autocast casts those weights again on every
call, and every op has a fixed launch cost. The fewer tokens a block keeps, the larger their share, so a pruned model
cannot reach the FLOP ceiling however cheap its routing is.

[`measure_block_scaling`] runs all of the model's blocks on a sequence of each token count of the unpruned and the
pruned schedule, interleaved, and fits `time per block = fixed + per_mac * block_macs(n)` over them. All blocks, not
one again and again, so that each call reads its weights from memory as a forward does: one small block repeated
would find them in the CPU's cache. Summing the measured times over the schedule gives the speedup the blocks alone
allow on this machine, the quantity the benchmark's `ideal` variant measures with the embedding, the final norm and
the pooling included.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models.cropr_vit.configuration_cropr_vit import CroprViTConfig
from ..models.cropr_vit.modeling_cropr_vit import CroprViTLayer
from .timing import interleaved_timings


def measure_block_scaling(
    blocks: Sequence[CroprViTLayer],
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
    """Median time per block of `blocks` at each token count of `config`'s unpruned and pruned schedules, and what
    they add up to.

    Args:
        blocks: the model's blocks in eval mode (every block of a CroprViT has the same shape), each run on the same
            input; rotary position embeddings, where the config has them, are left out, so each is a plain block.
        config: the pruned model's config: its `token_counts()` give the sequence lengths.
        batch_size: images per call.
        autocast: returns a fresh autocast context (or a null context) entered around every call, as the model
            would be run.
        warmup, repeats, min_time, clock, progress: as for [`interleaved_timings`].

    Returns:
        `block_ms` (median ms per block at each token count, longest first), the fit `fixed_ms` + `ms_per_gmac` (with
        its `fixed_share` of the unpruned block's time, and `fit_error`, its largest deviation from a measured time
        relative to that time: a large one means the block's time is not linear in its work, e.g. where the kernel
        changes with the sequence length), `weight_mb` (one block's parameters in their stored dtype),
        `blocks_speedup` (the unpruned schedule's summed block time over the pruned one's) and `blocks_flop_ceiling`
        (the same ratio of block multiply-adds).
    """
    unpruned, pruned = config.token_counts(pruned=False), config.token_counts(pruned=True)
    counts = sorted(set(unpruned) | set(pruned), reverse=True)
    parameter = next(blocks[0].parameters())
    generator = torch.Generator().manual_seed(0)
    inputs = {
        tokens: torch.randn(batch_size, tokens, config.hidden_size, generator=generator).to(parameter.device)
        for tokens in counts
    }

    def step_at(tokens: int) -> Callable[[], Any]:
        def step() -> Any:
            with torch.inference_mode(), autocast():
                return [block(inputs[tokens]) for block in blocks]

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
    seconds = {tokens: statistics.median(samples[f"n={tokens}"]) / len(blocks) for tokens in counts}
    gmacs = [batch_size * config.block_macs(tokens) / 1e9 for tokens in counts]
    measured_ms = [seconds[tokens] * 1e3 for tokens in counts]
    if len(counts) > 1:
        ms_per_gmac, fixed_ms = statistics.linear_regression(gmacs, measured_ms)
    else:  # an unpruned schedule: one length, nothing to fit
        ms_per_gmac, fixed_ms = measured_ms[0] / gmacs[0], 0.0
    fit_error = max(abs(fixed_ms + ms_per_gmac * g - ms) / ms for g, ms in zip(gmacs, measured_ms, strict=True))
    return {
        "batch_size": batch_size,
        "block_ms": {str(tokens): seconds[tokens] * 1e3 for tokens in counts},
        "fixed_ms": fixed_ms,
        "ms_per_gmac": ms_per_gmac,
        "fixed_share": fixed_ms / (seconds[unpruned[0]] * 1e3),
        "fit_error": fit_error,
        "weight_mb": sum(p.numel() * p.element_size() for p in blocks[0].parameters()) / 1e6,
        "blocks_speedup": sum(seconds[n] for n in unpruned) / sum(seconds[n] for n in pruned),
        "blocks_flop_ceiling": sum(map(config.block_macs, unpruned)) / sum(map(config.block_macs, pruned)),
    }


def format_block_scaling(dtype_name: str, result: dict[str, Any]) -> list[str]:
    """Report lines for one dtype and batch size of [`measure_block_scaling`]."""
    times = ", ".join(f"{tokens} {ms:.2f}" for tokens, ms in result["block_ms"].items())
    allowed = result["blocks_speedup"]
    ceiling = result["blocks_flop_ceiling"]
    return [
        f"{dtype_name:<5} batch {result['batch_size']}: ms per block at n tokens: {times}",
        f"      fit: {result['fixed_ms']:.2f} ms fixed ({result['fixed_share']:.1%} of the unpruned block; its "
        f"weights are {result['weight_mb']:.1f} MB) + {result['ms_per_gmac']:.2f} ms/GMAC, within "
        f"{result['fit_error']:.1%} of every measured time; the blocks allow "
        f"{allowed:.3f}x of their {ceiling:.3f}x FLOP ceiling ({allowed / ceiling:.3f})",
    ]
