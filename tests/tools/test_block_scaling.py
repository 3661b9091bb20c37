"""The block-scaling measurement: the blocks timed at every token count of the schedule, a fit that separates the
fixed cost per call from the cost per multiply-add, and the speedup the measured times add up to. Blocks that
advance a fake clock by a known time check the arithmetic exactly; no real speed is asserted (speed claims come from
`scripts/benchmark.py`)."""

import contextlib

import pytest
import torch
from conftest import tiny_config_kwargs
from torch import nn

from cropr import CroprViTConfig
from cropr.tools import timing
from cropr.tools.block_scaling import format_block_scaling, measure_block_scaling

FIXED_S, PER_GMAC_S = 0.004, 2e3  # the tiny block: 4 ms per call, plus 2 s per GMAC (~0.5 ms at 17 tokens)


class FakeClock:
    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setitem(timing.CLOCKS, "wall", fake)
    return fake


class TimedBlock(nn.Module):
    """Advances `clock` by FIXED_S + PER_GMAC_S * block GMACs per call and records the autocast state it ran under."""

    def __init__(self, config: CroprViTConfig, clock: FakeClock):
        super().__init__()
        self.config = config
        self.clock = clock
        self.weight = nn.Parameter(torch.zeros(3))
        self.calls: list[tuple[int, int, bool]] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, tokens, _ = hidden_states.shape
        self.calls.append((batch_size, tokens, torch.is_autocast_enabled("cpu")))
        self.clock.seconds += FIXED_S + PER_GMAC_S * batch_size * self.config.block_macs(tokens) / 1e9
        return hidden_states


def test_the_fit_recovers_a_known_fixed_cost_and_the_sums_follow_the_schedule(clock):
    config = CroprViTConfig(**tiny_config_kwargs())
    assert config.token_counts() == [17, 13, 10, 17] and config.token_counts(pruned=False) == [17] * 4
    block = TimedBlock(config, clock)
    result = measure_block_scaling([block, block], config, 2, contextlib.nullcontext, repeats=3)
    assert list(result["block_ms"]) == ["17", "13", "10"]
    assert {(batch, tokens) for batch, tokens, _ in block.calls} == {(2, 17), (2, 13), (2, 10)}
    assert len(block.calls) % 2 == 0  # every call of the measured step runs both blocks
    assert result["fixed_ms"] == pytest.approx(FIXED_S * 1e3)
    assert result["ms_per_gmac"] == pytest.approx(PER_GMAC_S * 1e3)
    assert result["fixed_share"] == pytest.approx(result["fixed_ms"] / result["block_ms"]["17"])
    assert result["fit_error"] == pytest.approx(0.0, abs=1e-9)
    assert result["weight_mb"] == pytest.approx(3 * 4 / 1e6)
    macs = {n: 2 * config.block_macs(n) / 1e9 for n in (17, 13, 10)}
    seconds = {n: FIXED_S + PER_GMAC_S * gmacs for n, gmacs in macs.items()}
    expected = 4 * seconds[17] / (2 * seconds[17] + seconds[13] + seconds[10])
    assert result["blocks_speedup"] == pytest.approx(expected)
    flop_ceiling = 4 * config.block_macs(17) / sum(map(config.block_macs, [17, 13, 10, 17]))
    assert result["blocks_flop_ceiling"] == pytest.approx(flop_ceiling)


def test_every_call_runs_under_the_autocast_context(clock):
    config = CroprViTConfig(**tiny_config_kwargs())
    block = TimedBlock(config, clock)
    measure_block_scaling([block], config, 1, lambda: torch.autocast("cpu", dtype=torch.bfloat16), repeats=2)
    assert block.calls and all(autocast for _, _, autocast in block.calls)


def test_an_unpruned_schedule_has_one_length_and_no_fit(clock):
    config = CroprViTConfig(**tiny_config_kwargs(token_selector="none"))
    result = measure_block_scaling([TimedBlock(config, clock)], config, 1, contextlib.nullcontext, repeats=1)
    assert list(result["block_ms"]) == ["17"]
    assert result["fixed_ms"] == 0.0 and result["blocks_speedup"] == 1.0 == result["blocks_flop_ceiling"]
    assert result["fit_error"] == pytest.approx(0.0, abs=1e-12)


def test_the_report_lines_name_the_fixed_cost_and_the_allowed_speedup():
    result = {
        "batch_size": 1,
        "block_ms": {"197": 20.0, "37": 5.5},
        "fixed_ms": 2.0,
        "ms_per_gmac": 12.0,
        "fixed_share": 0.1,
        "fit_error": 0.021,
        "weight_mb": 28.3,
        "blocks_speedup": 1.5,
        "blocks_flop_ceiling": 1.6,
    }
    first, second = format_block_scaling("fp32", result)
    assert first == "fp32  batch 1: ms per block at n tokens: 197 20.00, 37 5.50"
    assert "2.00 ms fixed (10.0% of the unpruned block; its weights are 28.3 MB) + 12.00 ms/GMAC, within 2.1%" in second
    assert "the blocks allow 1.500x of their 1.600x FLOP ceiling (0.938)" in second
