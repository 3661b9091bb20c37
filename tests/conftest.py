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

# Arguments of a training-script run of a few seconds: the tiny preset on a few built-in scenes, 3 steps.
TINY_RUN = [
    "--preset", "tiny",
    "--canvas_size", "56",
    "--image_size", "32",
    "--num_train_samples", "32",
    "--num_eval_samples", "16",
    "--max_steps", "3",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--throughput_batch_size", "8",
    "--report_to", "none",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
    "--use_cpu", "true",
]  # fmt: skip


def tiny_config_kwargs(**overrides) -> dict:
    """The `tiny` preset: a 4-block, 32-wide CroprViT on 32x32 images with 8x8 patches (16 patches + CLS), 5 labels."""
    from cropr.presets import PRESETS

    return {**PRESETS["tiny"], "num_labels": 5, **overrides}


def head_classes() -> dict:
    """Each model class under a short name: the bare backbone and the three task heads."""
    from cropr import (
        CroprViTForImageClassification,
        CroprViTForMultiLabelClassification,
        CroprViTForSemanticSegmentation,
        CroprViTModel,
    )

    return {
        "base": CroprViTModel,
        "classification": CroprViTForImageClassification,
        "multi_label": CroprViTForMultiLabelClassification,
        "segmentation": CroprViTForSemanticSegmentation,
    }


TASK_HEADS = ("classification", "multi_label", "segmentation")


def build_tiny(head: str, **overrides):
    """A `tiny`-preset model of `head` (a `head_classes()` key); segmentation gets one query per patch."""
    from cropr import CroprViTConfig

    if head == "segmentation":
        overrides.setdefault("num_queries", 16)
    return head_classes()[head](CroprViTConfig(**tiny_config_kwargs(**overrides)))


@pytest.fixture
def tiny_config():
    from cropr import CroprViTConfig

    return CroprViTConfig(**tiny_config_kwargs())


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("needs the full data files of the development machines (CI has them)")
    return SHARED_DATA


@pytest.fixture
def tiny_backbone(tmp_path) -> Path:
    """A saved random DINOv2 of 4 blocks at 32 px (16 patches), with its image processor: two Cropr modules with Last
    Layer Fusion once converted."""
    from transformers import Dinov2Config, Dinov2Model, ViTImageProcessorPil

    config = Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    ViTImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(tmp_path / "dinov2")
    return tmp_path / "dinov2"
