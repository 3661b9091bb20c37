"""Shared test settings: offline Hub, one thread per process (the suite runs on 2 CPU cores), tiny configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def tiny_config_kwargs(**overrides) -> dict:
    """A 4-block, 32-wide CroprViT on 32x32 images with 8x8 patches (16 patches + CLS)."""
    kwargs = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        pruning_rate=3,
        num_labels=5,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    from cropr import CroprViTConfig

    return CroprViTConfig(**tiny_config_kwargs())


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA
