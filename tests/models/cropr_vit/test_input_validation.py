"""Bad inputs fail early with an error that names the problem and the expected value, never deep inside torch.

Covers pixel values through every head, resolutions (the "keep ratios" policy of `patch_keep_counts`), labels of
each head, and conflicting training-script arguments.
"""

import json
import warnings

import pytest
import torch
from conftest import build_tiny, head_classes, tiny_config_kwargs
from transformers import ViTImageProcessorPil

from cropr import (
    CroprViTConfig,
    CroprViTForImageClassification,
    CroprViTModel,
)
from cropr.training.arguments import ModelArguments, PruningArguments, RunError
from cropr.training.run import run
from cropr.training.tasks import TASKS, build_model

HEAD_CLASSES = head_classes()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {head: build_tiny(head) for head in HEAD_CLASSES}


# ----------------------------------------------------------------------------------------------------------------------
# Pixel values
# ----------------------------------------------------------------------------------------------------------------------
BAD_PIXELS = [
    pytest.param(None, ValueError, r"`pixel_values` is required", id="missing"),
    pytest.param(torch.randn(2, 32, 32).numpy(), TypeError, r"must be a torch.Tensor, got ndarray", id="numpy"),
    pytest.param(torch.randn(3, 32, 32), ValueError, r"4 dimensions .* got shape \(3, 32, 32\)", id="rank-3"),
    pytest.param(torch.randn(1, 2, 3, 32, 32), ValueError, r"4 dimensions .* \(1, 2, 3, 32, 32\)", id="rank-5"),
    pytest.param(
        torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ValueError, r"floating-point .* torch.uint8", id="uint8"
    ),
    pytest.param(torch.zeros(2, 3, 32, 32, dtype=torch.long), ValueError, r"floating-point .* torch.int64", id="int64"),
    pytest.param(torch.randn(0, 3, 32, 32), ValueError, r"empty batch", id="empty-batch"),
    pytest.param(torch.randn(2, 1, 32, 32), ValueError, r"1 channels but the model expects 3", id="grey"),
    pytest.param(torch.randn(2, 4, 32, 32), ValueError, r"4 channels but the model expects 3", id="rgba"),
    pytest.param(torch.randn(2, 32, 32, 3), ValueError, r"32 channels but the model expects 3", id="channels-last"),
    pytest.param(
        torch.randn(2, 3, 48, 48),
        ValueError,
        r"\(48x48\) doesn't match the model \(32x32\).*interpolate_pos_encoding",
        id="size",
    ),
]


@pytest.mark.parametrize("head", HEAD_CLASSES)
@pytest.mark.parametrize(("pixel_values", "error", "message"), BAD_PIXELS)
@pytest.mark.parametrize("training", [False, True])
def test_bad_pixel_values_are_named_in_every_head(models, head, pixel_values, error, message, training):
    model = models[head].train(training)
    with pytest.raises(error, match=message) as raised:
        model(pixel_values)
    # Raised by the model's own check, before any torch operation could fail on the input.
    # (`in`, not `==`: mutation testing runs every function under a decorated name.)
    assert "check_pixel_values" in raised.traceback[-1].name, raised.traceback[-1].name


@pytest.mark.parametrize("head", HEAD_CLASSES)
def test_smaller_than_one_patch_is_refused_even_when_interpolating(models, head):
    with pytest.raises(ValueError, match=r"\(4x6\) is smaller than one patch \(8x8\)"):
        models[head].eval()(torch.randn(1, 3, 4, 6), interpolate_pos_encoding=True)


@pytest.mark.parametrize("head", ["classification", "segmentation"])
def test_half_and_double_pixel_values_are_cast_to_the_weights(models, head):
    model = models[head].eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x).logits
    assert torch.allclose(model(x.double()).logits, expected, atol=1e-6)
    assert torch.allclose(model(x.half()).logits, expected, atol=5e-2)


@pytest.mark.parametrize("selector", ["cropr", "variance", "attention"])
def test_strided_and_channels_last_pixel_values_give_the_same_outputs(selector):
    model = build_tiny("segmentation", token_selector=selector).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))[:, :, ::2, ::2]
    expected = model(x.contiguous()).logits
    assert torch.allclose(model(x).logits, expected, atol=1e-6)
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)).logits, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Resolution policy: at another resolution every module removes the same share of patch tokens, at least one kept
# ----------------------------------------------------------------------------------------------------------------------
def vit_b16_shaped(**overrides) -> CroprViTConfig:
    """The default 224 px / 16 px / 12-block schedule (R=16 + LLF) on a narrow width, so it runs fast."""
    return CroprViTConfig(
        **{"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 32, "num_labels": 3, **overrides}
    )


def kept_patches(model, height: int, width: int) -> list[int]:
    output = model.eval()(torch.randn(2, 3, height, width), interpolate_pos_encoding=True, output_kept_indices=True)
    return [indices.shape[1] - model.config.num_prefix_tokens for indices in output.kept_indices]


@pytest.mark.parametrize(("height", "width"), [(64, 64), (32, 48), (16, 16), (72, 40), (448, 448)])
def test_a_224_schedule_keeps_its_ratios_at_other_resolutions(height, width):
    config = vit_b16_shaped()
    model = CroprViTForImageClassification(config)
    num_patches = (height // 16) * (width // 16)
    expected = [config.patch_keep_counts(num_patches)[block] for block in config.pruning_blocks]
    kept = kept_patches(model, height, width)
    # A 1-patch image has nothing to prune: modules then keep every token and report it.
    assert kept == [min(count, num_patches) for count in expected]
    assert min(kept) >= 1
    shares = [1 - count / num_patches for count in expected]
    reference = [1 - count / config.num_patches for count in config.patch_keep_counts()]
    if num_patches >= 16:  # each module's removal is a rounded share of the reference removal
        assert shares[-1] == pytest.approx(reference[config.pruning_blocks[-1]], abs=len(expected) / num_patches)


def test_a_schedule_that_removes_almost_everything_still_keeps_one_patch_at_low_resolution():
    config = vit_b16_shaped(pruning_schedule=[195] + [0] * 11)  # 224 px: 196 patches, keeps 1 (+CLS)
    model = CroprViTModel(config)
    assert kept_patches(model, 64, 64) == [1]
    assert kept_patches(model, 224, 224) == [1]
    assert kept_patches(model, 448, 448) == [config.patch_keep_counts(28 * 28)[0]] == [4]
    output = model(torch.randn(1, 3, 64, 64), interpolate_pos_encoding=True)
    assert output.last_hidden_state.shape == (1, 17, 32)  # LLF restores all 16 patches + CLS


def test_segmentation_at_another_resolution_evaluates_but_refuses_to_train_its_modules(models):
    model = models["segmentation"]
    x, labels = torch.randn(2, 3, 48, 40), torch.randint(0, 5, (2, 48, 40))
    output = model.eval()(x, labels=labels, interpolate_pos_encoding=True)
    assert output.logits.shape == (2, 5, 6, 5) and torch.isfinite(output.loss)
    with pytest.raises(ValueError, match=r"configured size \(32, 32\) \(one query per patch\); got \(48, 40\)"):
        model.train()(x, labels=labels, interpolate_pos_encoding=True)


def test_training_free_segmentation_trains_at_another_resolution():
    model = build_tiny("segmentation", token_selector="variance").train()
    output = model(torch.randn(2, 3, 48, 48), labels=torch.randint(0, 5, (2, 48, 48)), interpolate_pos_encoding=True)
    output.loss.backward()
    assert output.logits.shape == (2, 5, 6, 6)


# ----------------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------------
X = torch.randn(2, 3, 32, 32)
BAD_LABELS = [
    pytest.param(
        "classification",
        torch.tensor([0, 5]),
        ValueError,
        r"class ids in \[0, 4\], got values in \[0, 5\]",
        id="cls-high",
    ),
    pytest.param(
        "classification", torch.tensor([-1, 2]), ValueError, r"class ids in \[0, 4\].*\[-1, 2\]", id="cls-negative"
    ),
    pytest.param(
        "classification", torch.tensor([[0], [1]]), ValueError, r"shape \(2,\), got .* \(2, 1\)", id="cls-column"
    ),
    pytest.param("classification", torch.tensor([0, 1, 2]), ValueError, r"3 rows but the batch has 2", id="cls-batch"),
    pytest.param(
        "classification", torch.tensor(1), ValueError, r"one row per image \(2\).*0-dimensional", id="cls-scalar"
    ),
    pytest.param("classification", [0, 1], TypeError, r"must be a torch.Tensor, got list", id="cls-list"),
    pytest.param(
        "classification",
        torch.tensor([0.0, 1.0]),
        ValueError,
        r"multi-hot of shape \(2, 5\), got \(2,\).*integer tensor",
        id="cls-float-ids",
    ),
    pytest.param(
        "multi_label", torch.tensor([1, 3]), ValueError, r"multi-hot of shape \(2, 5\), got \(2,\)", id="ml-ids"
    ),
    pytest.param("multi_label", torch.full((2, 5), 0.5), ValueError, r"every value 0 or 1", id="ml-soft"),
    pytest.param("multi_label", torch.full((2, 5), 2.0), ValueError, r"every value 0 or 1", id="ml-two"),
    pytest.param("multi_label", torch.full((2, 5), float("nan")), ValueError, r"every value 0 or 1", id="ml-nan"),
    pytest.param("multi_label", torch.ones(2, 4), ValueError, r"\(2, 5\), got \(2, 4\)", id="ml-width"),
    pytest.param(
        "segmentation",
        torch.zeros(2, 16, 16, dtype=torch.long),
        ValueError,
        r"\(2, 32, 32\) like the images, got \(2, 16, 16\).*nearest",
        id="seg-size",
    ),
    pytest.param(
        "segmentation",
        torch.zeros(2, 1, 32, 32, dtype=torch.long),
        ValueError,
        r"got \(2, 1, 32, 32\)",
        id="seg-channel",
    ),
    pytest.param(
        "segmentation", torch.zeros(3, 32, 32, dtype=torch.long), ValueError, r"got \(3, 32, 32\)", id="seg-batch"
    ),
    pytest.param(
        "segmentation",
        torch.zeros(2, 32, 32),
        ValueError,
        r"integer class ids, got dtype torch.float32",
        id="seg-float",
    ),
    pytest.param(
        "segmentation",
        torch.full((2, 32, 32), 7),
        ValueError,
        r"\[0, 4\] or the ignore index 255, got \[7\]",
        id="seg-high",
    ),
    pytest.param("segmentation", torch.full((2, 32, 32), -1), ValueError, r"got \[-1\]", id="seg-negative"),
    pytest.param("segmentation", [[0]], TypeError, r"must be a torch.Tensor, got list", id="seg-list"),
]


@pytest.mark.parametrize(("head", "labels", "error", "message"), BAD_LABELS)
def test_bad_labels_are_named_for_each_head(models, head, labels, error, message):
    model = models[head].train()
    with pytest.raises(error, match=message) as raised:
        model(X, labels=labels)
    raised_in = raised.traceback[-1].name
    assert "check_" in raised_in or "resolve_problem_type" in raised_in, raised_in


@pytest.mark.parametrize("head", HEAD_CLASSES)
@pytest.mark.parametrize("keyword", ["attention_mask", "bool_masked_pos", "head_mask"])
def test_unknown_keyword_arguments_are_named_in_a_type_error(models, head, keyword):
    with pytest.raises(TypeError, match=rf"unexpected keyword arguments: `{keyword}`\."):
        models[head].eval()(X, **{keyword: None})


@pytest.mark.parametrize("head", HEAD_CLASSES)
def test_the_keyword_arguments_of_transformers_keep_working(models, head):
    model = models[head].eval()
    output = model(X, output_attentions=True, output_hidden_states=True, return_dict=True)
    assert len(output.attentions) == 4 and len(output.hidden_states) == 5
    assert isinstance(model(X, return_dict=False), tuple)


def test_trainer_leaves_the_loss_to_the_model_and_scales_it_for_gradient_accumulation(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, gradient_accumulation_steps=2)
    trainer = Trainer(model=build_tiny("classification"), args=args)
    # Without it Trainer passes `num_items_in_batch` and skips the division by the accumulation steps, which a loss
    # averaged over its batch needs.
    assert trainer.model_accepts_loss_kwargs is False


def test_regression_labels_with_a_label_axis_are_not_broadcast():
    model = build_tiny("classification", num_labels=1).train()
    targets = torch.tensor([0.5, -1.0])
    expected = model(X, labels=targets).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a target size broadcasts against the input
        assert torch.equal(model(X, labels=targets[:, None]).loss, expected)
    with pytest.raises(ValueError, match=r"must have shape \(2, 3\), got \(2,\)"):
        build_tiny("classification", num_labels=3, problem_type="regression").train()(X, labels=targets)


def test_the_multi_label_head_defaults_to_multi_label_and_keeps_an_explicit_problem_type():
    assert build_tiny("multi_label").config.problem_type == "multi_label_classification"
    with pytest.warns(UserWarning, match="computes that problem's loss"):
        model = build_tiny("multi_label", problem_type="single_label_classification").train()
    assert model.config.problem_type == "single_label_classification"
    assert torch.isfinite(model(X, labels=torch.tensor([0, 4])).loss)


def test_explicit_single_label_problem_type_rejects_float_labels():
    model = build_tiny("classification", problem_type="single_label_classification").train()
    with pytest.raises(ValueError, match=r"integer class ids of shape \(2,\), got dtype torch.float32"):
        model(X, labels=torch.tensor([0.0, 1.0]))


def test_a_failed_call_does_not_change_how_later_labels_are_read():
    model = build_tiny("classification").train()
    with pytest.raises(ValueError):
        model(X, labels=torch.tensor([0.0, 1.0]))  # float ids would make it multi-label
    assert model.config.problem_type is None
    model(X, labels=torch.tensor([0, 1]))
    assert model.config.problem_type == "single_label_classification"


def test_valid_edge_labels_are_accepted():
    # All pixels ignored; integer multi-hot labels; regression targets.
    build_tiny("segmentation").train()(X, labels=torch.full((2, 32, 32), 255)).loss.backward()
    build_tiny("multi_label").train()(X, labels=torch.zeros(2, 5, dtype=torch.long)).loss.backward()
    build_tiny("classification", num_labels=1).train()(X, labels=torch.tensor([0.5, -1.0])).loss.backward()


# ----------------------------------------------------------------------------------------------------------------------
# Training-script arguments
# ----------------------------------------------------------------------------------------------------------------------
BASE_ARGS = ["--preset", "tiny", "--image_size", "32", "--report_to", "none", "--use_cpu", "true"]


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        (
            "image-classification",
            ["--token_selector", "none", "--pruning_rate", "4"],
            "none prunes nothing, so --pruning_rate",
        ),
        (
            "image-classification",
            ["--token_selector", "none", "--pruning_schedule", "2,0,0,0"],
            "--pruning_schedule would be ignored",
        ),
        (
            "semantic-segmentation",
            ["--token_selector", "none", "--curriculum_ramp", "0.5"],
            "--curriculum_ramp would be ignored",
        ),
        ("image-classification", ["--pruning_rate", "2", "--pruning_schedule", "2,0,0,0"], "replaces --pruning_rate"),
        ("image-classification", ["--curriculum_per_epoch", "true"], "--curriculum_ramp is 0"),
        ("image-classification", ["--curriculum_ramp", "-1"], "a share of training, from 0"),
        ("semantic-segmentation", ["--curriculum_ramp", "1.5"], "a share of training, from 0"),
        ("image-classification", ["--do_eval"], "would evaluate untrained Cropr modules"),
        ("multi-label-classification", ["--do_eval", "--token_selector", "non_salient"], "untrained Cropr modules"),
        ("image-classification", ["--do_eval", "--resume_from_checkpoint", "x"], "this run does not train"),
        ("image-classification", ["--token_selector", "random", "--aux_loss_weight", "0.5"], "has no Cropr modules"),
        ("image-classification", ["--model_name_or_path", "a", "--backbone", "b"], "not both"),
    ],
)
def test_conflicting_script_arguments_fail_before_any_loading(tmp_path, task, extra, message):
    with pytest.raises(ValueError, match=message):
        run(task, [*BASE_ARGS, "--output_dir", str(tmp_path), *extra])


@pytest.fixture(scope="module")
def variance_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variance")
    config = CroprViTConfig(
        **tiny_config_kwargs(token_selector="variance", last_layer_fusion=False, aux_loss_weight=0.5)
    )
    CroprViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_fine_tuning_a_checkpoint_keeps_its_own_pruning_settings(variance_checkpoint):
    labels = {index: str(index) for index in range(5)}
    task = TASKS["image-classification"]
    model, _ = build_model(
        task, ModelArguments(model_name_or_path=str(variance_checkpoint)), PruningArguments(), labels, 56
    )
    assert (model.config.token_selector, model.config.last_layer_fusion, model.config.aux_loss_weight) == (
        "variance",
        False,
        0.5,
    )
    overrides = PruningArguments(token_selector="random", last_layer_fusion=True)
    model, _ = build_model(task, ModelArguments(model_name_or_path=str(variance_checkpoint)), overrides, labels, 56)
    assert (model.config.token_selector, model.config.last_layer_fusion) == ("random", True)
    with pytest.raises(ValueError, match=r"--image_size 64 does not match .*\(32x32\)"):
        build_model(
            task,
            ModelArguments(model_name_or_path=str(variance_checkpoint), image_size=64),
            PruningArguments(),
            labels,
            64,
        )


def test_another_label_set_needs_ignore_mismatched_sizes(variance_checkpoint):
    task, labels = TASKS["image-classification"], {index: str(index) for index in range(3)}
    with pytest.raises(RunError, match="predicts 5 labels and the data has 3: pass --ignore_mismatched_sizes"):
        build_model(task, ModelArguments(model_name_or_path=str(variance_checkpoint)), PruningArguments(), labels, 56)
    model_args = ModelArguments(model_name_or_path=str(variance_checkpoint), ignore_mismatched_sizes=True)
    model, _ = build_model(task, model_args, PruningArguments(), labels, 56)
    assert model.classifier.linear.out_features == 3 and model.config.id2label == labels
    saved = CroprViTForImageClassification.from_pretrained(variance_checkpoint)
    assert torch.equal(model.base_model.layers[0].mlp.fc1.weight, saved.base_model.layers[0].mlp.fc1.weight)


# ----------------------------------------------------------------------------------------------------------------------
# `cropr info` overrides that would be ignored
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_info_refuses_a_pruning_rate_it_would_ignore_and_applies_one_over_a_saved_schedule(tmp_path, capsys):
    from cropr.cli import main

    capsys.readouterr()
    assert main(["info", "tiny", "--token-selector", "none", "--pruning-rate", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cropr: error: --pruning-rate has no effect") and "token selector 'none'" in err, err
    assert main(["info", "tiny", "--token-selector", "none"]) == 0
    # A rate replaces an explicit schedule, as `from_pretrained(path, pruning_rate=R)` does.
    stage_config = tmp_path / "stage.json"
    CroprViTConfig(**tiny_config_kwargs(pruning_schedule=[4, 4, 0, 0])).to_json_file(stage_config)
    capsys.readouterr()
    assert main(["info", str(stage_config), "--pruning-rate", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_counts"] == [17, 14, 12, 17]
    assert main(["info", str(stage_config), "--image-size", "64"]) == 0
