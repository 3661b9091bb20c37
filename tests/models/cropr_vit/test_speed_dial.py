"""One checkpoint, many speeds: `set_pruning_rate` / `set_pruning_schedule`, `from_pretrained(path, pruning_rate=R)`
and `pipeline(..., model_kwargs={"pruning_rate": R})` run a trained model at another schedule with the same weights."""

import numpy as np
import pytest
import torch
from conftest import build_tiny, tiny_config_kwargs
from PIL import Image
from transformers import ViTImageProcessorPil, pipeline

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.models.cropr_vit.modeling_cropr_vit import CroprViTPreTrainedModel


def pixels(batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trained_tiny(head: str = "classification", **overrides) -> CroprViTPreTrainedModel:
    """A tiny model whose queries moved away from their initialisation (so a stale or fresh router would show)."""
    model = build_tiny(head, **overrides)
    with torch.no_grad():
        for router in model.base_model.token_selector.routers.values():
            router.queries.normal_(generator=torch.Generator().manual_seed(len(router.queries)))
    return model.eval()


def fresh_model_at(model: CroprViTPreTrainedModel, **schedule) -> CroprViTPreTrainedModel:
    """A model built for the schedule, holding the weights of `model` (those its modules have)."""
    config = CroprViTConfig(**{**model.config.to_dict(), "router_blocks": None, **schedule})
    fresh = type(model)(config).eval()
    fresh.load_state_dict(model.state_dict(), strict=False)
    return fresh.eval()


@pytest.mark.parametrize("stripped", [False, True])
@pytest.mark.parametrize("rate", [0, 1, 2, 5])
def test_a_set_rate_computes_what_a_model_built_for_it_computes(rate, stripped):
    model = trained_tiny()
    if stripped:
        model.strip_training_modules()
    expected = fresh_model_at(model, pruning_rate=rate)
    model.set_pruning_rate(rate)
    x = pixels()
    output = model(x, output_kept_indices=True)
    reference = expected(x, output_kept_indices=True)
    assert torch.equal(output.logits, reference.logits)
    # 16 patches; the first module also removes one token for the CLS token.
    expected_kept = [16 - rate - 1, 16 - 2 * rate - 1] if rate else []
    assert [indices.shape[1] - 1 for indices in output.kept_indices] == expected_kept
    for indices, expected_indices in zip(output.kept_indices, reference.kept_indices, strict=True):
        assert torch.equal(indices, expected_indices)


def test_the_dial_turns_both_ways_and_an_unpruned_setting_keeps_the_modules(tmp_path):
    model = trained_tiny()
    x = pixels()
    expected = model(x).logits
    model.set_pruning_rate(0)
    assert model.config.router_blocks == [0, 1] and not model.config.pruning_blocks
    assert torch.equal(model(x).logits, model.with_token_selector("none")(x).logits)
    model.save_pretrained(tmp_path / "unpruned")
    reloaded = CroprViTForImageClassification.from_pretrained(tmp_path / "unpruned").eval()
    for turned_back in (model, reloaded):
        assert torch.equal(turned_back.set_pruning_rate(3)(x).logits, expected)
        assert turned_back.config.router_blocks is None
    # The schedule is a structural field: the model now describes, and saves, the new schedule.
    model.set_pruning_schedule([4, 1, 0, 0])
    model.save_pretrained(tmp_path / "heavier")
    assert CroprViTForImageClassification.from_pretrained(tmp_path / "heavier").config.pruning_schedule == [4, 1, 0, 0]


def test_a_schedule_needing_a_module_the_model_lacks_fails_naming_the_blocks_that_have_one():
    model = trained_tiny(pruning_schedule=[3, 0, 0, 0])
    x = pixels()
    expected = model(x).logits
    with pytest.raises(
        ValueError,
        match=r"prunes after blocks \[1\], which have no Cropr module: this model has "
        r"modules after blocks \[0\] only",
    ):
        model.set_pruning_rate(2)
    # The failed call changed nothing.
    assert model.config.pruning_schedule == [3, 0, 0, 0] and model.config.router_blocks is None
    assert torch.equal(model(x).logits, expected)
    model.set_pruning_schedule([5, 0, 0, 0])
    assert model(x, output_kept_indices=True).kept_indices[0].shape[1] == 1 + 16 - 5


@pytest.mark.parametrize(
    ("schedule", "selector", "rate_range", "nearest", "lacking"),
    [
        (None, "cropr", (0, 7), 3, []),  # the tiny preset's own rate
        ([3, 4, 0, 0], "cropr", (0, 7), 3, []),  # 7 tokens, as R=3 removes (3 + the CLS token's share, then 3)
        ([5, 4, 0, 0], "cropr", (0, 7), 4, []),  # 9 tokens: R=4 removes 9
        ([3, 0, 0, 0], "cropr", None, None, [1]),  # no module after block 1, where every rate prunes
        ([3, 0, 0, 0], "variance", (0, 7), 1, []),  # no modules needed; 3 tokens, as R=1 removes
        ([3, 5, 0, 0], "cropr", (0, 7), 3, []),  # 8 tokens: R=3 removes 7 and R=4 removes 9, the lower wins
        (None, "none", None, None, []),
    ],
)
def test_the_config_reports_the_rates_its_modules_run(schedule, selector, rate_range, nearest, lacking):
    config = CroprViTConfig(**tiny_config_kwargs(pruning_schedule=schedule, token_selector=selector))
    assert config.pruning_rate_range() == rate_range
    assert config.nearest_pruning_rate() == nearest
    assert config.blocks_lacking_rate_modules() == lacking
    if rate_range is not None:  # every rate of the range builds, at the schedule `schedule_at_rate` names
        for rate in range(rate_range[0], rate_range[1] + 1):
            assert CroprViTConfig.from_dict(config.to_dict(), pruning_rate=rate).effective_pruning_schedule == (
                config.schedule_at_rate(rate)
            )


def test_a_config_at_rate_0_without_modules_runs_no_other_rate():
    config = CroprViTConfig(**tiny_config_kwargs(pruning_rate=0))
    assert config.pruning_rate_range() is None and config.blocks_lacking_rate_modules() == [0, 1]
    kept = CroprViTConfig.from_dict(CroprViTConfig(**tiny_config_kwargs()).to_dict(), pruning_rate=0)
    assert kept.pruning_rate_range() == (0, 7)  # turned down from R=3, it keeps its modules


def test_selectors_without_modules_take_any_schedule():
    model = build_tiny("classification", token_selector="variance", pruning_schedule=[3, 0, 0, 0]).eval()
    model.set_pruning_rate(2)
    assert [indices.shape[1] for indices in model(pixels(), output_kept_indices=True).kept_indices] == [14, 12]


def test_other_structural_changes_still_fail():
    model = trained_tiny()
    with pytest.raises(ValueError, match=r"set_pruning_rate\(\.\.\.\)"):
        model.config.pruning_rate = 2
        model(pixels())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_from_pretrained_and_pipeline_take_the_rate(tmp_path):
    model = trained_tiny()
    model.save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    processor = ViTImageProcessorPil.from_pretrained(tmp_path)
    x = processor(image, return_tensors="pt")["pixel_values"]
    for rate in (0, 1, 5):
        expected = fresh_model_at(model, pruning_rate=rate)(x).logits
        loaded = CroprViTForImageClassification.from_pretrained(tmp_path, pruning_rate=rate)
        assert loaded.config.pruning_rate == rate
        # Loaded weights may be views into the checkpoint file, whose alignment changes the CPU kernels' rounding
        # (by about 1e-8): equal up to that here and below, where another schedule would differ by far more.
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=1e-6)
        classifier = pipeline("image-classification", model=str(tmp_path), model_kwargs={"pruning_rate": rate})
        assert classifier.model.config.pruning_rate == rate
        scores = {entry["label"]: entry["score"] for entry in classifier(image, top_k=5)}
        probabilities = expected.softmax(-1)[0]
        for index, probability in enumerate(probabilities.tolist()):
            assert scores[model.config.id2label[index]] == pytest.approx(probability, abs=1e-6)
    # Loaded unpruned, the model still holds its modules and can be dialled up again.
    unpruned = CroprViTForImageClassification.from_pretrained(tmp_path, pruning_rate=0)
    assert sorted(unpruned.cropr_vit.token_selector.routers) == ["0", "1"]
    torch.testing.assert_close(unpruned.set_pruning_rate(3)(x).logits, model(x).logits, rtol=0, atol=1e-6)


def test_a_rate_asked_for_replaces_a_saved_schedule(tmp_path):
    """A checkpoint saved at an explicit schedule runs at the per-block rate `from_pretrained` is given, as
    `set_pruning_rate` would set it, not at its saved schedule with the rate left unused."""
    model = trained_tiny().set_pruning_schedule([3, 0, 0, 0])
    model.save_pretrained(tmp_path)
    loaded = CroprViTForImageClassification.from_pretrained(tmp_path, pruning_rate=2).eval()
    assert loaded.config.pruning_schedule is None and loaded.config.effective_pruning_schedule == [3, 2, 0, 0]
    x = pixels()
    torch.testing.assert_close(loaded(x).logits, model.set_pruning_rate(2)(x).logits, rtol=0, atol=1e-6)
    kept = CroprViTForImageClassification.from_pretrained(tmp_path, pruning_rate=2, pruning_schedule=[1, 1, 0, 0])
    assert kept.config.effective_pruning_schedule == [1, 1, 0, 0]  # an explicit schedule still wins
    assert CroprViTForImageClassification.from_pretrained(tmp_path).config.pruning_schedule == [3, 0, 0, 0]
