"""Side-by-side inference timing: the one measurement every speed figure of the project comes from."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_seconds(
    runners: Mapping[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of each runner, interleaved round-robin after `warmup` untimed rounds.

    Interleaving spreads any drift of the machine (other processes, clock boost, thermal) evenly over the variants,
    which matters more for a ratio than the absolute numbers.
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}")
    for _ in range(warmup):
        for runner in runners.values():
            runner()
    _synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            _synchronize(device)
            start = time.perf_counter()
            runner()
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


@torch.inference_mode()
def measure_throughput(
    models: Mapping[str, torch.nn.Module], pixel_values: torch.Tensor, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median images per second of each model (eval mode) on the same batch, measured interleaved."""
    runners = {name: (lambda model=model: model.eval()(pixel_values)) for name, model in models.items()}
    seconds = measure_seconds(runners, pixel_values.device, repeats=repeats, warmup=warmup)
    return {name: pixel_values.shape[0] / statistics.median(values) for name, values in seconds.items()}


__all__ = ["measure_seconds", "measure_throughput"]
