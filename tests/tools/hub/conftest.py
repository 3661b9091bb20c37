"""Fixtures for the Hub tests: a local Hub on 127.0.0.1 and a runner for client processes pointed at it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from .local_hub import LocalHub

CLIENT = Path(__file__).with_name("hub_client.py")
SCENARIO_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def local_hub() -> Iterator[LocalHub]:
    """A fresh in-memory Hub served on a free port for the module; shut down at teardown."""
    with LocalHub() as hub:
        yield hub


@pytest.fixture(scope="module")
def run_client(local_hub: LocalHub, tmp_path_factory) -> Callable[..., dict]:
    """Run one `hub_client.py` scenario in a separate Python process against `local_hub`; return what it saved.

    The process gets `HF_ENDPOINT` (the local Hub), a temporary `HF_HOME`, `HF_HUB_OFFLINE=0` and a dummy token in
    its environment before anything is imported, and the repository's `src` on its path. `isolated=True` runs it
    with `python -I` (the scenario itself blocks the installed `cropr`).
    """
    work_dir = tmp_path_factory.mktemp("hub_client")

    def run(scenario: str, *, isolated: bool = False) -> dict:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "PYTHON"))
        }
        env.update(
            HF_ENDPOINT=local_hub.url,
            HF_HOME=str(work_dir / f"hf_home_{scenario}"),
            HF_HUB_OFFLINE="0",
            HF_TOKEN="hf_local_dummy_token",
            HF_HUB_DISABLE_TELEMETRY="1",
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            # The checked-out package rather than an installed copy (`-I` ignores it; that process must not import it).
            PYTHONPATH=str(CLIENT.parents[2] / "src"),
        )
        command = [sys.executable, *(["-I"] if isolated else []), str(CLIENT), scenario, str(work_dir)]
        completed = subprocess.run(
            command, env=env, cwd=work_dir, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S
        )
        assert completed.returncode == 0, f"scenario {scenario!r} failed:\n{completed.stderr[-6000:]}"
        assert not local_hub.unhandled, f"the client used endpoints the local Hub lacks: {local_hub.unhandled}"
        return torch.load(work_dir / f"{scenario}.pt")

    return run
