"""The functions behind the demo page: checkpoints at other pruning rates, safe image reading, examples, one
comparison with pruning off and on, and the text the page shows. None of them needs Gradio."""

import sys

import numpy as np
import pytest
import torch
from conftest import build_tiny, tiny_config_kwargs
from PIL import Image

from cropr import CroprViTConfig, CroprViTModel
from cropr.cli import main
from cropr.data.images import SAMPLE_PHOTOS
from cropr.tools import demo
from cropr.tools.demo import (
    Comparison,
    DemoCheckpoint,
    DemoError,
    compare,
    example_image,
    example_names,
    latency_summary,
    load_image,
    mask_annotations,
    segmentation_mask,
    tokens_table,
    top_classes,
)
from cropr.tools.demo_app import slider_settings

NAMES = {0: "cat", 1: "dog", 2: "bird", 3: "fish", 4: "frog"}


def save_checkpoint(model, folder, processor_kwargs=None):
    from transformers import ViTImageProcessorPil

    model.save_pretrained(folder)
    ViTImageProcessorPil(**{"size": {"height": 32, "width": 32}, **(processor_kwargs or {})}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    """A stripped (inference-only) tiny classifier trained at R=3: 16 patches, modules after blocks 0 and 1."""
    model = build_tiny("classification", id2label=NAMES).strip_training_modules()
    return DemoCheckpoint(save_checkpoint(model, tmp_path_factory.mktemp("classification")))


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory):
    return DemoCheckpoint(save_checkpoint(build_tiny("segmentation"), tmp_path_factory.mktemp("segmentation")))


@pytest.fixture
def photo():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and pruning rates
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"image_size": 40},
        {"image_size": 40, "last_layer_fusion": False},
        {"image_size": 40, "use_cls_token": False},
        {"num_register_tokens": 4},
    ],
)
def test_rate_range_ends_at_the_highest_rate_the_config_accepts(overrides, tmp_path):
    checkpoint = DemoCheckpoint(save_checkpoint(build_tiny("classification", **overrides), tmp_path))
    assert checkpoint.trained_rate == 3
    low, high = checkpoint.config.pruning_rate_range()
    assert low == 0
    CroprViTConfig(**tiny_config_kwargs(**overrides, pruning_rate=high))
    with pytest.raises(ValueError, match="removes"):
        CroprViTConfig(**tiny_config_kwargs(**overrides, pruning_rate=high + 1))


@pytest.mark.parametrize("rate", [0, 1, 7])
def test_a_stripped_checkpoint_runs_at_every_rate_of_its_range(classification, rate):
    model = classification.at_rate(rate)
    assert model.config.pruning_rate == rate
    assert model.config.token_counts() == CroprViTConfig(**tiny_config_kwargs(pruning_rate=rate)).token_counts()
    assert classification.at_rate(rate) is model  # cached


def test_the_trained_rate_and_pruning_off_share_the_loaded_weights(classification):
    assert classification.at_rate(None) is classification.at_rate(3) is classification.model
    assert classification.unpruned.config.token_selector == "none"
    trained = classification.model.state_dict()
    for name, tensor in classification.unpruned.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_rates_outside_the_range_and_fixed_schedules_are_refused(classification, tmp_path):
    with pytest.raises(DemoError, match=r"in 0\.\.7 for this model, got 8"):
        classification.at_rate(8)
    fixed = build_tiny("classification", pruning_schedule=[4, 0, 0, 0])
    checkpoint = DemoCheckpoint(save_checkpoint(fixed, tmp_path))
    assert checkpoint.config.pruning_rate_range() is None and checkpoint.trained_rate is None
    assert checkpoint.at_rate(None) is checkpoint.model
    with pytest.raises(
        DemoError, match=r"only its saved schedule .*no Cropr module after blocks \[1\], where a pruning"
    ):
        checkpoint.at_rate(2)
    assert slider_settings(checkpoint)["interactive"] is False
    assert slider_settings(checkpoint)["label"] == "Pruning rate (fixed schedule)"


def test_a_schedule_with_a_module_after_every_block_of_a_rate_gets_the_rates(tmp_path):
    """What the training scripts save from a backbone: an explicit schedule pruning after every module's block."""
    model = build_tiny("classification", pruning_schedule=[3, 4, 0, 0]).strip_training_modules()
    saved_as_rate = build_tiny("classification", pruning_schedule=[4, 3, 0, 0]).strip_training_modules()
    checkpoint = DemoCheckpoint(save_checkpoint(model, tmp_path / "saved"))
    assert checkpoint.config.pruning_rate_range() == (0, 7) and checkpoint.trained_rate is None
    assert checkpoint.at_rate(None) is checkpoint.model
    # R=3 removes 3 + 1 (the CLS token's share) + 3 = 7 tokens, as the saved schedule does.
    assert checkpoint.config.nearest_pruning_rate() == 3
    assert checkpoint.at_rate(3).config.effective_pruning_schedule == [4, 3, 0, 0]
    assert checkpoint.at_rate(2).config.effective_pruning_schedule == [3, 2, 0, 0]
    assert checkpoint.at_rate(0).config.effective_pruning_schedule == [0, 0, 0, 0]
    settings = slider_settings(checkpoint)
    assert (settings["minimum"], settings["maximum"], settings["value"], settings["interactive"]) == (0, 7, 3, True)
    assert "per-block schedule removing about as many tokens as R=3" in settings["label"]
    # A saved schedule that is a rate's own runs on the loaded model at that rate: no second copy of the weights.
    same = DemoCheckpoint(save_checkpoint(saved_as_rate, tmp_path / "same"))
    assert same.config.nearest_pruning_rate() == 3 and same.at_rate(3) is same.model


def test_a_checkpoint_without_modules_for_the_rates_offers_none(tmp_path):
    """Saved at rate 0 without Cropr modules: any other rate would need routers it does not have."""
    unpruned = build_tiny("classification", pruning_rate=0).strip_training_modules()
    checkpoint = DemoCheckpoint(save_checkpoint(unpruned, tmp_path))
    assert checkpoint.config.pruning_rate_range() is None and checkpoint.config.nearest_pruning_rate() is None
    assert checkpoint.at_rate(None) is checkpoint.model
    with pytest.raises(DemoError, match=r"runs only its saved schedule .*no Cropr module after blocks \[0, 1\]"):
        checkpoint.at_rate(2)
    assert slider_settings(checkpoint)["interactive"] is False


def test_slider_follows_the_checkpoint(classification):
    settings = slider_settings(classification)
    assert (settings["minimum"], settings["maximum"], settings["value"]) == (0, 7, 3)
    assert settings["interactive"] is True


def test_checkpoints_that_are_not_croprvit_task_models_are_refused(tmp_path):
    from transformers import ViTConfig

    with pytest.raises(DemoError, match="has no config.json"):
        DemoCheckpoint(str(tmp_path))
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(DemoError, match="holds a 'vit' model, not a CroprViT one"):
        DemoCheckpoint(str(tmp_path / "vit"))
    backbone = CroprViTModel(CroprViTConfig(**tiny_config_kwargs()))
    with pytest.raises(DemoError, match="CroprViTModel: the demo needs a classification"):
        DemoCheckpoint(save_checkpoint(backbone, tmp_path / "backbone"))
    build_tiny("classification").save_pretrained(tmp_path / "no-processor")
    with pytest.raises(DemoError, match="no usable image processor"):
        DemoCheckpoint(str(tmp_path / "no-processor"))
    with pytest.raises(DemoError, match="Cannot load 'no/such-model' as a checkpoint"):
        DemoCheckpoint("no/such-model")


def test_describe_names_task_shape_and_schedule(classification):
    text = classification.describe()
    assert "CroprViTForImageClassification (classification, 5 classes), 32x32 input, 16 patches" in text
    assert "R=3 per block" in text


# ----------------------------------------------------------------------------------------------------------------------
# Images and examples
# ----------------------------------------------------------------------------------------------------------------------
def test_load_image_reads_upright_rgb_at_working_size(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "WORKING_SIDE", 50)
    path = tmp_path / "photo.jpg"
    image = Image.new("RGB", (200, 100), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    image.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (25, 50)


def test_load_image_scales_16_bit_images(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_refuses_bad_input_with_a_readable_message(tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DemoError, match=r"notes.png is not an image file"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DemoError, match="cut.png could not be read as an image"):
        load_image(truncated)
    with pytest.raises(DemoError, match="is not a file"):
        load_image(tmp_path)
    large = tmp_path / "large.png"
    Image.new("RGB", (300, 200)).save(large)
    monkeypatch.setattr(demo, "MAX_IMAGE_PIXELS", 50_000)
    with pytest.raises(DemoError, match=r"large.png \(300x200, 0 megapixels\) is too large"):
        load_image(large)
    monkeypatch.setattr(demo, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # beyond twice Pillow's own limit: refused on opening
    with pytest.raises(DemoError, match="large.png is too large"):
        load_image(large)


def test_examples_are_photos_and_scenes_of_the_checkpoint_task(segmentation):
    pytest.importorskip("skimage")
    names = example_names(segmentation)
    assert names == [*SAMPLE_PHOTOS, "built-in scene 1", "built-in scene 2"]
    assert example_image("chelsea", segmentation).size == (451, 300)
    scene = example_image("built-in scene 2", segmentation)
    assert scene.mode == "RGB" and scene.size == (56, 56)  # the smallest segmentation canvas (model: 32 px)
    for name in ("built-in scene 3", "nothing", "built-in scene x"):
        with pytest.raises(DemoError, match="no built-in example"):
            example_image(name, segmentation)


# ----------------------------------------------------------------------------------------------------------------------
# One comparison
# ----------------------------------------------------------------------------------------------------------------------
def test_compare_classification_matches_the_models_run_directly(classification, photo, tmp_path):
    comparison = compare(classification, photo, 6, tmp_path, repeats=2)
    pixel_values = classification.image_processor(images=photo, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pruned = type(classification.model).from_pretrained(classification.source, pruning_rate=6).eval()
        expected_on = top_classes(pruned(pixel_values).logits[0], pruned.config)
        expected_off = top_classes(classification.unpruned(pixel_values).logits[0], pruned.config)
    assert comparison.on == pytest.approx(expected_on)
    assert comparison.off == pytest.approx(expected_off)
    assert list(comparison.on) == list(expected_on)
    assert comparison.rate == 6
    assert comparison.token_counts_off == [17] * 4
    assert comparison.token_counts_on == [17, 10, 4, 17]  # 7 (6 + CLS) after block 0, 6 after block 1, LLF
    assert comparison.flop_ceiling == pytest.approx(pruned.config.flop_ceiling())
    assert set(comparison.latency_ms) == {"off", "on"} and min(comparison.latency_ms.values()) > 0
    assert comparison.image.height == demo.DISPLAY_HEIGHT
    assert comparison.heatmap.height > demo.DISPLAY_HEIGHT and comparison.heatmap.mode == "RGB"
    assert list(tmp_path.iterdir()) == []  # the heat-map file is read back and removed


def test_compare_shows_the_center_crop_of_a_cropping_processor(tmp_path, photo):
    # As a converted DeiT, DINOv2 or CLIP classifier: shortest edge 36, then the middle 32x32.
    crop = {"size": {"shortest_edge": 36}, "do_center_crop": True, "crop_size": 32}
    model = build_tiny("classification", id2label=NAMES).strip_training_modules()
    checkpoint = DemoCheckpoint(save_checkpoint(model, tmp_path / "crop", crop))
    comparison = compare(checkpoint, photo, None, tmp_path, repeats=1)
    # The 64x48 photo is shown as the square the model sees, so the heat-map's patches line up with it.
    assert comparison.image.size == (demo.DISPLAY_HEIGHT, demo.DISPLAY_HEIGHT)
    pixel_values = checkpoint.image_processor(images=photo, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == (32, 32)
    with torch.no_grad():
        assert comparison.off == pytest.approx(top_classes(checkpoint.unpruned(pixel_values).logits[0], model.config))


def test_compare_heatmap_changes_with_the_rate(classification, photo, tmp_path):
    none = compare(classification, photo, 0, tmp_path, repeats=1)
    most = compare(classification, photo, 7, tmp_path, repeats=1)
    assert none.token_counts_on == none.token_counts_off
    assert np.asarray(none.heatmap).tolist() != np.asarray(most.heatmap).tolist()


def test_compare_segmentation_gives_masks_at_display_size(segmentation, photo, tmp_path):
    comparison = compare(segmentation, photo, None, tmp_path, repeats=1)
    width, height = comparison.image.size
    for mask in (comparison.off, comparison.on):
        assert mask.shape == (height, width) and mask.dtype == np.int64
    annotations = mask_annotations(comparison.on, segmentation.config.id2label)
    areas = [int(area.sum()) for area, _ in annotations]
    assert areas == sorted(areas, reverse=True) and sum(areas) == width * height


def test_top_classes_softmax_or_sigmoid():
    config = CroprViTConfig(**tiny_config_kwargs(id2label=NAMES))
    logits = torch.tensor([0.0, 3.0, 1.0, -1.0, 2.0])
    top = top_classes(logits, config, k=3)
    assert list(top) == ["dog", "frog", "bird"]
    assert top["dog"] == pytest.approx(logits.softmax(-1)[1].item())
    config.problem_type = "multi_label_classification"
    assert top_classes(logits, config, k=9)["dog"] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert len(top_classes(logits, config, k=9)) == 5


def test_segmentation_mask_upsamples_patch_logits():
    logits = torch.zeros(3, 2, 2)
    logits[2, 0, 1] = 5.0  # top-right patch is class 2
    mask = segmentation_mask(logits, (8, 4))
    assert mask.shape == (4, 8)
    assert mask[0, 7] == 2 and mask[3, 0] == 0


def test_page_text_reports_tokens_and_latency():
    comparison = Comparison(
        image=None,
        heatmap=None,
        off={},
        on={},
        token_counts_off=[17, 17, 17],
        token_counts_on=[17, 9, 17],
        latency_ms={"off": 10.0, "on": 4.0},
        rate=4,
        flop_ceiling=1.8,
    )
    table = tokens_table(comparison).splitlines()
    assert table[0].startswith("| block | tokens, pruning off | tokens, pruning on")
    assert table[3] == f"| 1 | 17 | 9 | {'█' * round(demo.BAR_WIDTH * 9 / 17)} |"
    text = latency_summary(comparison, 5)
    assert "median of 5 timed calls" in text
    assert "pruning off **10.0 ms**, pruning on (R = 4) **4.0 ms**: **2.50x** (FLOP ceiling 1.80x)" in text


# ----------------------------------------------------------------------------------------------------------------------
# `cropr demo` before the page starts
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_demo_says_when_the_default_model_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cropr: error: there is no model in {demo.DEFAULT_CHECKPOINT} yet: `make main` trains one")


def test_cli_demo_refuses_a_checkpoint_that_does_not_load(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert main(["demo", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cropr: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_demo_without_gradio_names_the_extra(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    assert main(["demo", "anything"]) == 1
    assert 'needs Gradio, an optional dependency: pip install "cropr[demo]"' in capsys.readouterr().err


def test_cli_demo_options_are_checked_before_anything_loads(capsys):
    assert main(["demo", "--threads", "0"]) == 2
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["demo", "--port", "70000"]) == 2
    assert main(["demo", "--help"]) == 0
    assert "--threads" in capsys.readouterr().out


def test_the_package_and_the_demo_functions_do_not_import_gradio():
    # This module imported `cropr.cli`, `cropr.tools.demo` and `cropr.tools.demo_app`; no test imports Gradio itself
    # (the browser test runs the app in its own process).
    assert "gradio" not in sys.modules
