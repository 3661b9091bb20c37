"""The pipeline latency measurement times what it says: both pipelines on every photo, one image at a time, and the
image processor alone. No speed is asserted (speed claims come from `scripts/benchmark.py`)."""

import pytest
from conftest import tiny_config_kwargs
from PIL import Image
from transformers import ViTImageProcessorPil

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.tools import pipeline_latency
from cropr.tools.pipeline_latency import measure_pipeline_latency


def test_both_pipelines_run_every_photo_at_batch_one(monkeypatch):
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs())).eval()
    size = model.config.image_size_hw
    processor = ViTImageProcessorPil(size={"height": size[0], "width": size[1]})
    photos = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (40, 90), "blue")]
    batches: dict[str, list] = {"cropr": [], "none": []}
    with_token_selector = type(model).with_token_selector

    def recording_twin(self, selector):
        twin = with_token_selector(self, selector)
        twin.register_forward_pre_hook(
            lambda module, args, kwargs: batches["none"].append(kwargs["pixel_values"].shape), with_kwargs=True
        )
        return twin

    monkeypatch.setattr(type(model), "with_token_selector", recording_twin)
    model.register_forward_pre_hook(
        lambda module, args, kwargs: batches["cropr"].append(kwargs["pixel_values"].shape), with_kwargs=True
    )
    result = measure_pipeline_latency(model, processor, photos, warmup=1, repeats=2)

    for shapes in batches.values():
        assert len(shapes) == 3 * len(photos)  # warm-up + 2 repeats, one call per photo
        assert {tuple(shape) for shape in shapes} == {(1, 3, *size)}
    latency = result["latency_ms"]
    assert set(latency) == {"processor", "cropr", "none"} and min(latency.values()) > 0
    assert result["speedup"] == pytest.approx(latency["none"] / latency["cropr"])
    assert result["ceiling_fraction"] == pytest.approx(result["speedup"] / model.config.flop_ceiling())
    assert result["processor_share"] == pytest.approx(latency["processor"] / latency["cropr"])
    assert result["photos"] == 2 and result["photo_sizes"] == [[64, 48], [40, 90]]


def test_sample_photos_are_the_default(monkeypatch):
    loaded = []
    monkeypatch.setattr(pipeline_latency, "sample_photo", lambda name: loaded.append(name) or Image.new("RGB", (8, 8)))
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs())).eval()
    measure_pipeline_latency(model, ViTImageProcessorPil(size={"height": 32, "width": 32}), repeats=1)
    assert loaded == list(pipeline_latency.SAMPLE_PHOTOS)
