"""The ViT backbone shipped in the package: it loads offline and converts, and its pretraining saw only training
garments."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification, ViTModel

import cropr
from cropr.data import load_fashion_mnist
from cropr.data.scenes import NOISE_MAX
from cropr.pretrained import BACKBONE_DIR
from experiments.pretraining import (
    PretrainConfig,
    garment_canvases,
    parse_phases,
    patch_labels,
    pretrain,
    pretraining_scenes,
    run,
    segment_scenes,
    window_hidden,
)


def test_shipped_backbone_loads_offline_and_converts():
    files = {path.name: path.stat().st_size for path in BACKBONE_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert sum(files.values()) <= 10 * 2**20
    source = ViTModel.from_pretrained(BACKBONE_DIR, local_files_only=True).float().eval()
    model, processor = cropr.from_backbone(BACKBONE_DIR, "image-classification", num_labels=10, token_selector="none")
    assert processor.size == {"height": 112, "width": 112}
    pixel_values = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = source(pixel_values).last_hidden_state
        converted = model.eval().base_model(pixel_values).last_hidden_state
    torch.testing.assert_close(converted, expected, atol=1e-4, rtol=1e-4)


def test_model_card_states_the_measured_accuracy_and_the_data():
    card = (BACKBONE_DIR / "README.md").read_text()
    log = json.loads((BACKBONE_DIR / "pretraining_log.json").read_text())
    assert f"{100 * log['eval_accuracy']:.1f}%" in card
    assert "training split" in card and "python scripts/pretrain_backbone.py" in card


class TrainingSplitOnly:
    """Fashion-MNIST whose test split cannot be read: pretraining must never need it."""

    def __init__(self, per_class: int = 2) -> None:
        data = load_fashion_mnist("subset")
        keep = np.concatenate([np.flatnonzero(data.train_labels == label)[:per_class] for label in range(10)])
        self.train_images, self.train_labels = data.train_images[keep], data.train_labels[keep]

    @property
    def test_images(self):
        raise AssertionError("pretraining read the test split")

    test_labels = test_images


def test_pretraining_reads_only_the_training_split():
    config = PretrainConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        phases=[("garments", 32, 1), ("segments", 56, 1), ("scenes", 40, 1)],
        scenes_per_epoch=8,
        batch_size=8,
        warmup_steps=1,
        monitor_scenes=4,
    )
    model, records = pretrain(config, TrainingSplitOnly())
    assert [record["canvas"] for record in records] == [32, 56, 40]
    assert "garment_patch_accuracy" in records[1] and "train_accuracy" in records[2]
    assert "accuracy_on_4_eval_scenes" in records[-1]
    assert isinstance(model, ViTForImageClassification)


@pytest.mark.parametrize("blank", ["train", "test"])
def test_pretraining_images_are_made_of_training_garments(blank):
    # Blank out one split's garments: pretraining images must show garments exactly when the training split has them.
    data = TrainingSplitOnly()
    if blank == "train":
        data.train_images = np.zeros_like(data.train_images)
    scenes, _ = pretraining_scenes(data, num_scenes=6, canvas_size=56, seed=0, epoch=0)
    segments, maps = segment_scenes(data, num_scenes=6, canvas_size=56, seed=0, epoch=0)
    garments, _, _ = garment_canvases(data, 32, torch.Generator().manual_seed(0))
    if blank == "train":
        assert max(scenes.max(), segments.max()) <= NOISE_MAX and garments.max() == 0 and maps.max() == 0
    else:
        assert all(image.max() > NOISE_MAX for image in [*scenes, *segments]) and all(garments.flatten(1).amax(1) > 0)


def test_window_hidden_at_full_size_is_the_models_output():
    config = PretrainConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    vit_config = config.vit_config()
    vit_config.num_labels = 10
    model = ViTForImageClassification(vit_config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.vit(pixel_values=pixel_values).last_hidden_state
        assert torch.equal(window_hidden(model, pixel_values, torch.zeros(2, 2, dtype=torch.long)), expected)


def test_phases_parse_and_bad_ones_name_the_problem():
    assert parse_phases("garments32x16,scenes112x2") == [("garments", 32, 16), ("scenes", 112, 2)]
    assert parse_phases("segments56x3") == [("segments", 56, 3)]
    with pytest.raises(ValueError, match="KINDSIZExEPOCHS"):
        parse_phases("crops32x1")
    with pytest.raises(ValueError, match="multiple of 8"):
        parse_phases("scenes60x1")


def test_patch_labels_are_each_patchs_most_frequent_class():
    maps = torch.zeros(1, 16, 16, dtype=torch.uint8)
    maps[0, :8, :5] = 3  # 40 of the 64 pixels of the first patch
    maps[0, 8:, 8:] = 7
    assert patch_labels(maps, 8).tolist() == [[3, 0, 0, 7]]


TINY_RUN = PretrainConfig(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=1,
    phases=[("scenes", 40, 1)],
    scenes_per_epoch=8,
    batch_size=8,
    warmup_steps=1,
    monitor_scenes=4,
    eval_scenes=4,
)
"""A pretraining run of one tiny epoch, for the tests that run `run` or `pretrain` end to end."""


def test_a_continued_run_starts_from_the_earlier_weights_and_its_card_tells_both_runs(tmp_path):
    config = TINY_RUN
    run(config, tmp_path / "first", "python scripts/pretrain_backbone.py")
    # A learning rate of 0 leaves the weights where the continued run found them.
    continued = dataclasses.replace(config, init_from=str(tmp_path / "first"), learning_rate=0.0)
    results = run(continued, tmp_path / "second", "python scripts/pretrain_backbone.py --init-from first")
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)

    assert results["records"][0]["epoch"] == 2  # its scenes follow the earlier run's
    card = (tmp_path / "second" / "README.md").read_text()
    assert "`python scripts/pretrain_backbone.py` then `python scripts/pretrain_backbone.py --init-from first`" in card
    assert "then, continuing from that checkpoint, 1 epoch of scenes" in card


def test_bf16_precision_runs_the_forward_in_bfloat16_and_keeps_fp32_weights(tmp_path):
    config = dataclasses.replace(TINY_RUN, learning_rate=1e-2)
    data = TrainingSplitOnly()
    models = {
        precision: pretrain(dataclasses.replace(config, precision=precision), data)[0] for precision in ("fp32", "bf16")
    }
    weights = {precision: model.vit.state_dict() for precision, model in models.items()}
    assert all(value.dtype == torch.float32 for value in weights["bf16"].values())
    # Same seed, same batches: only the rounding of the bfloat16 forward can tell the two runs apart.
    assert any(not torch.equal(weights["fp32"][key], weights["bf16"][key]) for key in weights["fp32"])
    results = run(dataclasses.replace(config, precision="bf16"), tmp_path, "python scripts/pretrain_backbone.py")
    assert "bfloat16 autocast" in (tmp_path / "README.md").read_text() and results["config"]["precision"] == "bf16"
