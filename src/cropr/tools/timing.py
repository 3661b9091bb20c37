"""Side-by-side timing: the one measurement every speed figure of the project comes from.

Variants run round-robin, in an order rotated every repeat, after warm-up; each sample lasts at least `min_time`
seconds. Interleaving spreads any drift of the machine (other processes, clock boost, heat) over all variants, which
matters more for a ratio than for the absolute numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "wall": elapsed time. "cpu": CPU seconds of this process (all its threads), which other processes on a shared
# machine do not inflate; with more than one torch thread it also counts the time idle threads spin, so it is only
# a fair clock for one thread.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(step: Callable[[], Any], iterations: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call of `step` on `clock` (see `CLOCKS`), over `iterations` back-to-back calls."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(iterations):
        step()
    synchronize(device)
    return (now() - start) / iterations


def interleaved_timings(
    steps: Mapping[str, Callable[[], Any]],
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    min_time: float = 0.0,
    progress: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each step on `clock`, one sample per repeat; variants run round-robin in a rotated order.

    Each step first runs `warmup` times (at least once, which also sets how many calls make one sample: enough to
    last `min_time` seconds).
    """
    if clock not in CLOCKS:
        raise ValueError(f"Unknown clock {clock!r}; choose from {sorted(CLOCKS)}.")
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}")
    iterations = {}
    for name, step in steps.items():
        estimate = time_calls(step, max(warmup, 1), device, clock)
        iterations[name] = max(1, math.ceil(min_time / max(estimate, 1e-9)))
        if progress:
            progress(f"warm-up {name}: {estimate * 1e3:.2f} ms/call, {iterations[name]} call(s) per sample")
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            samples[name].append(time_calls(steps[name], iterations[name], device, clock))
        if progress:
            progress(
                f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {samples[n][-1] * 1e3:.2f} ms" for n in names)
            )
    return samples


@torch.inference_mode()
def measure_throughput(
    models: Mapping[str, torch.nn.Module],
    pixel_values: torch.Tensor,
    repeats: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
    min_time: float = 0.0,
    clock: str = "wall",
) -> dict[str, float]:
    """Median images per second of each model (eval mode) on the same batch, measured interleaved.

    `progress` is called once per model after its warm-up and once per repeat; `min_time` and `clock` as for
    [`interleaved_timings`] (images per CPU-second with `clock="cpu"`).
    """
    steps = {name: (lambda model=model: model.eval()(pixel_values)) for name, model in models.items()}
    samples = interleaved_timings(
        steps, pixel_values.device, warmup=warmup, repeats=repeats, min_time=min_time, progress=progress, clock=clock
    )
    return {name: pixel_values.shape[0] / statistics.median(values) for name, values in samples.items()}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Environment variables that change how memory is allocated, and with it the time of a forward pass: glibc returns
# large freed blocks to the system by default, so every forward pass page-faults its activations in again.
ALLOCATOR_VARIABLES = (
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def allocator_settings() -> dict[str, str]:
    """The [`ALLOCATOR_VARIABLES`] set in this process's environment."""
    return {name: os.environ[name] for name in ALLOCATOR_VARIABLES if name in os.environ}


def machine_environment() -> dict[str, Any]:
    """What a measurement ran on: library versions, CPU, cores, torch threads, the allocator settings and the load
    average at the start."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores_available": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "allocator_settings": allocator_settings(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


__all__ = [
    "ALLOCATOR_VARIABLES",
    "CLOCKS",
    "allocator_settings",
    "available_cores",
    "cpu_model",
    "interleaved_timings",
    "machine_environment",
    "measure_throughput",
    "synchronize",
    "time_calls",
]
