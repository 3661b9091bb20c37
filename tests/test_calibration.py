"""Label-free calibration: only the Cropr modules learn, from the unpruned model's own predictions."""

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny
from PIL import Image
from transformers import SegformerImageProcessorPil, ViTImageProcessorPil, pipeline
from transformers.utils import logging as transformers_logging

import cropr.calibration as calibration
from cropr import CroprViTForImageClassification, CroprViTModel
from cropr.calibration import (
    STATE_FILE,
    calibrate,
    calibration_targets,
    load_for_calibration,
    with_training_modules,
)
from cropr.cli import main as cli_main
from cropr.models.cropr_vit.modeling_cropr_vit import CroprViTLayer

HEADS = ("base", "classification", "multi_label", "segmentation")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 random 40x40 RGB images (the processors resize them to the tiny models' 32x32)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
    return folder


def processor_for(head: str):
    size = {"height": 32, "width": 32}
    if head == "segmentation":
        return SegformerImageProcessorPil(size=size, do_reduce_labels=False)
    return ViTImageProcessorPil(size=size)


def tiny(head: str):
    torch.manual_seed(0)
    model = build_tiny(head).eval()
    if head != "base":  # a confident head, so that its predictions are worth learning
        head_module = model.decode_head if head == "segmentation" else model.classifier
        with torch.no_grad():
            head_module.linear.weight.mul_(20)
    return model


def calibrate_tiny(head: str, image_folder, output_dir=None, **options):
    """`calibrate` on the tiny `head` model with its processor: 8 images a step, no progress bar, unless told."""
    options = {"batch_size": 8, "progress": False, **options}
    return calibrate(tiny(head), image_folder, output_dir, image_processor=processor_for(head), **options)


def pixels(batch_size: int = 4) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("head", HEADS)
def test_backbone_and_head_stay_bit_identical_and_no_backward_pass_enters_them(head, image_folder, monkeypatch):
    source = tiny(head)
    backward_calls = []
    prepare = calibration.with_training_modules

    def with_hooks(model, overrides=None):
        variant = prepare(model, overrides)
        for module in variant.modules():
            if isinstance(module, CroprViTLayer) or module in (getattr(variant, "classifier", None),):
                module.register_full_backward_hook(lambda *args: backward_calls.append(args))
        return variant

    monkeypatch.setattr(calibration, "with_training_modules", with_hooks)
    result = calibrate(
        source, image_folder, image_processor=processor_for(head), max_steps=3, batch_size=8, progress=False
    )
    assert backward_calls == []
    calibrated = result.model.state_dict()
    outside_routers = {key: value for key, value in source.state_dict().items() if "token_selector." not in key}
    assert outside_routers and all(torch.equal(calibrated[key], value) for key, value in outside_routers.items())
    # The Cropr modules did learn.
    routers = [key for key in calibrated if key.endswith("aggregated_query")]
    assert any(not torch.equal(calibrated[key], source.state_dict()[key]) for key in routers)
    assert result.model.config.num_labels == source.config.num_labels


@pytest.mark.parametrize("head", HEADS)
def test_targets_come_from_the_unpruned_model(head):
    model = tiny(head)
    x = pixels()
    schedule = (model.config.pruning_rate, model.config.pruning_schedule)
    hidden_states, targets, mask = calibration_targets(model, x)
    assert (model.config.pruning_rate, model.config.pruning_schedule) == schedule  # the model's own schedule again
    assert all(states.shape[1] == 17 for states in hidden_states)  # every token reached every block
    unpruned, pruned = model.with_token_selector("none")(x), model(x)
    if head == "base":
        expected, other = unpruned.pooler_output, pruned.pooler_output
    elif head == "segmentation":
        expected = unpruned.logits.softmax(1).flatten(2).transpose(1, 2)
        other = pruned.logits.softmax(1).flatten(2).transpose(1, 2)
        assert mask.all()
    elif head == "multi_label":
        expected, other = unpruned.logits.sigmoid(), pruned.logits.sigmoid()
    else:
        expected, other = unpruned.logits.softmax(-1), pruned.logits.softmax(-1)
    assert torch.allclose(targets, expected, atol=1e-6) and not torch.allclose(targets, other, atol=1e-4)


def test_a_calibration_rate_replaces_a_saved_schedule():
    """As `from_pretrained(path, pruning_rate=R)` reads it: the rate is what the calibrated modules serve."""
    scheduled = with_training_modules(tiny("classification"), {"pruning_schedule": [3, 0, 0, 0]})
    assert sorted(scheduled.base_model.token_selector.routers) == ["0"]
    variant = with_training_modules(scheduled, {"pruning_rate": 2})
    assert variant.config.pruning_schedule is None and variant.config.effective_pruning_schedule == [3, 2, 0, 0]
    assert sorted(variant.base_model.token_selector.routers) == ["0", "1"]


def test_a_schedule_without_modules_is_refused_before_any_step(image_folder):
    with pytest.raises(ValueError, match=r"prunes after no block, so there is no Cropr module to calibrate"):
        calibrate(tiny("classification"), image_folder, image_processor=processor_for("classification"), pruning_rate=0)


def test_labels_replace_the_predictions_when_given():
    model = tiny("classification")
    _, targets, _ = calibration_targets(model, pixels(), torch.tensor([0, 3, 1, 4]))
    assert torch.equal(targets, torch.eye(5)[[0, 3, 1, 4]])


@pytest.mark.parametrize(
    ("head", "labels", "message"),
    [
        ("classification", torch.tensor([0, 3, 1, 7]), r"class ids in \[0, 4\], got values in \[0, 7\]"),
        ("segmentation", torch.full((4, 32, 32), 9), r"class ids in \[0, 4\] or the ignore index 255, got \[9\]"),
        ("base", torch.tensor([0, 1, 2, 3]), "a bare backbone has no classes to learn labels of"),
    ],
)
def test_labels_the_model_cannot_learn_are_refused_by_name(head, labels, message):
    with pytest.raises(ValueError, match=message):
        calibration_targets(tiny(head), pixels(), labels)


def test_twenty_steps_on_tiny_data_lower_the_auxiliary_loss(image_folder):
    result = calibrate_tiny("classification", image_folder, max_steps=20, learning_rate=1e-2)
    assert len(result.losses) == 20
    assert result.last_loss < 0.5 * result.first_loss


def test_a_segmenter_that_sees_only_skipped_classes_is_refused_and_nothing_is_saved(image_folder, tmp_path):
    """Its routers would learn nothing, and saving would replace the source's with untrained ones."""
    torch.manual_seed(0)
    model = build_tiny("segmentation", aux_ignored_labels=[0]).eval()
    with torch.no_grad():
        model.decode_head.linear.bias[0] = 100.0  # background everywhere
    with pytest.raises(ValueError, match=r"No patch of the 24 images had a target .* nothing is saved"):
        calibrate(
            model,
            image_folder,
            tmp_path / "calibrated",
            image_processor=processor_for("segmentation"),
            max_steps=2,
            batch_size=8,
            progress=False,
        )
    assert not (tmp_path / "calibrated" / "model.safetensors").exists()


def test_the_saved_checkpoint_reloads_and_runs_in_a_pipeline(image_folder, tmp_path):
    output_dir = tmp_path / "calibrated"
    result = calibrate_tiny("classification", image_folder, output_dir, max_steps=2)
    assert not (output_dir / STATE_FILE).exists()
    assert json.loads((output_dir / "calibration.json").read_text())["steps"] == 2
    reloaded = CroprViTForImageClassification.from_pretrained(output_dir)
    assert reloaded.config.inference_only and reloaded.config.pruning_rate == 3
    x = pixels()
    assert torch.equal(reloaded(x).logits, result.model(x).logits)
    classifier = pipeline("image-classification", model=str(output_dir), model_kwargs={"pruning_rate": 5})
    image = Image.open(image_folder / "00.png")
    assert len(classifier(image, top_k=5)) == 5


@pytest.mark.parametrize("head", HEADS)
def test_the_kept_scorers_are_the_compared_mix_closest_to_the_unpruned_predictions(head, image_folder):
    result = calibrate_tiny(head, image_folder, max_steps=3, contrast_weights=(0.0, 0.5, 1.0), selection_images=16)
    assert set(result.prediction_changes) == {0.0, 0.5, 1.0}
    assert result.prediction_changes[result.contrast_weight] == min(result.prediction_changes.values())
    # Measured again on the kept model as documented: the same 16 images (the first epoch's first ones), each
    # fraction of the schedule, against the unpruned predictions.
    model, data = result.model, calibration.CalibrationImages(image_folder)
    images, _ = data.batch(calibration._epoch_order(len(data), 0, 0)[:16])
    x = processor_for(head)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad(), calibration.unpruned(model):
        targets = calibration.model_predictions(model, model(x))
    changes = []
    for fraction in (1 / 3, 2 / 3, 1.0):
        schedule = [round(count * fraction) for count in model.config.effective_pruning_schedule]
        with torch.no_grad(), calibration.pruning_at(model, schedule):
            changes.append(float(calibration.prediction_change(model, model(x), targets).mean()))
    assert sum(changes) / 3 == pytest.approx(result.prediction_changes[result.contrast_weight], rel=1e-5)


@pytest.mark.parametrize(
    ("head", "decisions"),
    [("classification", "the class"), ("multi_label", "each label"), ("segmentation", "each patch's class")],
)
def test_a_prediction_change_is_the_share_of_changed_decisions(head, decisions):
    model = tiny(head)
    with torch.no_grad():
        output = model(pixels())
    targets = calibration.model_predictions(model, output)
    assert torch.equal(calibration.prediction_change(model, output, targets), torch.zeros(len(targets)))
    flipped = type(output)(logits=-output.logits)  # every decision reversed (a class of highest score becomes lowest)
    assert torch.equal(calibration.prediction_change(model, flipped, targets), torch.ones(len(targets))), decisions


def test_a_zero_share_alone_keeps_the_learned_queries_without_a_comparison(image_folder, monkeypatch):
    learned = {}
    choose_scorers = calibration.choose_scorers

    def recording(model, *args):
        learned.update({block: router.aggregated_query.clone() for block, router in routers_of(model).items()})
        return choose_scorers(model, *args)

    monkeypatch.setattr(calibration, "choose_scorers", recording)
    result = calibrate_tiny("classification", image_folder, max_steps=2, contrast_weights=(0.0,))
    assert result.contrast_weight == 0.0 and result.prediction_changes == {}
    for block, router in routers_of(result.model).items():
        assert torch.equal(router.aggregated_query, learned[block])
    with pytest.raises(ValueError, match="shares in"):
        calibrate_tiny("classification", image_folder, contrast_weights=(0.0, 1.5))


def routers_of(model):
    return model.base_model.token_selector.routers


@pytest.mark.parametrize("contrast_weights", [(0.0, 0.5, 1.0), (1.0,)])
def test_an_interrupted_calibration_resumes_where_it_stopped(contrast_weights, image_folder, tmp_path, monkeypatch):
    """With the contrast read-out alone, the kept scorers depend only on its sums, which must resume too."""
    settings = dict(max_steps=6, save_steps=2, contrast_weights=contrast_weights)
    uninterrupted = calibrate_tiny("classification", image_folder, tmp_path / "full", **settings)

    step = calibration._step

    def interrupted(model, data, processor, optimizer, index, *args):
        if index == 5:
            raise KeyboardInterrupt
        return step(model, data, processor, optimizer, index, *args)

    monkeypatch.setattr(calibration, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_tiny("classification", image_folder, tmp_path / "resumed", **settings)
    assert (tmp_path / "resumed" / STATE_FILE).is_file()
    monkeypatch.setattr(calibration, "_step", step)
    resumed = calibrate_tiny("classification", image_folder, tmp_path / "resumed", **settings)
    assert resumed.losses == uninterrupted.losses
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    monkeypatch.setattr(calibration, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_tiny("classification", image_folder, tmp_path / "other", **settings)
    monkeypatch.setattr(calibration, "_step", step)
    for other in ({"seed": 1}, {"learning_rate": 1e-2}, {"pruning_rate": 2}, {"contrast_weights": (0.0, 0.25)}):
        with pytest.raises(ValueError, match="other settings"):
            calibrate_tiny("classification", image_folder, tmp_path / "other", **{**settings, **other})


def tiny_vit_backbone(path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_a_backbone_is_calibrated_on_its_pooled_embedding_from_the_command_line(image_folder, tmp_path, capsys):
    source = tiny_vit_backbone(tmp_path / "vit")
    output_dir = tmp_path / "calibrated"
    argv = ["calibrate", str(source), "--images", str(image_folder), "--output-dir", str(output_dir)]
    capsys.readouterr()
    options = ["--max-steps", "2", "--batch-size", "8", "--pruning-rate", "3", "--contrast-weights", "0,1", "--quiet"]
    assert cli_main([*argv, *options, "--selection-images", "8"]) == 0
    printed = capsys.readouterr()
    assert "Calibrated 2 steps on 24 images" in printed.out
    summary = json.loads((output_dir / "calibration.json").read_text())
    assert set(summary["prediction_changes"]) == {"0.0", "1.0"} and summary["contrast_weight"] in (0.0, 1.0)
    assert f"scorers kept: {summary['contrast_weight']:g} of the contrast read-out" in printed.out
    assert "Stripped CroprViTModel checkpoint" in printed.out
    assert printed.out.rstrip().endswith("; it runs pruning rates 0..7 (pruning_rate=R)")  # 16 patches, 2 modules
    # --quiet silences transformers' loading and saving bars too, for this run only.
    assert "Loading weights" not in printed.err and "Writing model shards" not in printed.err
    assert transformers_logging.is_progress_bar_enabled()
    extractor = pipeline("image-feature-extraction", model=str(output_dir))
    features = np.asarray(extractor(Image.open(image_folder / "00.png")))
    assert features.shape == (1, 17, 32)
    assert cli_main([*argv, "--task", "image-classification"]) == 1
    assert "Cannot keep the source's classifier" in capsys.readouterr().err
    assert cli_main([*argv, "--task", "semantic-segmentation"]) == 1
    assert "its semantic-segmentation head would be untrained" in capsys.readouterr().err


def test_a_hub_classifier_keeps_its_head_and_learns_from_it(image_folder, tmp_path):
    """A source image classifier calibrated without labels, as an image classifier unless told otherwise: its own
    head gives the targets and stays as it was."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "cat", 1: "dog", 2: "fox"},
    )
    torch.manual_seed(0)
    source = ViTForImageClassification(config).eval()
    source.save_pretrained(tmp_path / "vit-classifier")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit-classifier")
    backbone, _, _ = load_for_calibration(tmp_path / "vit-classifier", "feature-extraction", pruning_rate=3)
    assert isinstance(backbone, CroprViTModel)
    from_object, processor, _ = load_for_calibration(source, pruning_rate=3)  # a model object converts as a folder does
    assert isinstance(from_object, CroprViTForImageClassification) and isinstance(processor, ViTImageProcessorPil)
    result = calibrate(
        str(tmp_path / "vit-classifier"),
        image_folder,
        tmp_path / "calibrated",
        max_steps=2,
        batch_size=8,
        pruning_rate=3,
        progress=False,
    )
    calibrated = CroprViTForImageClassification.from_pretrained(tmp_path / "calibrated").eval()
    assert calibrated.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    unpruned = calibrated.with_token_selector("none").eval()
    with torch.no_grad():
        torch.testing.assert_close(unpruned(pixels()).logits, source(pixels()).logits, rtol=0, atol=1e-5)
    assert result.steps == 2
