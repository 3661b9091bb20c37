import pytest
from conftest import tiny_config_kwargs

from cropr import CroprViTConfig
from cropr.models.cropr_vit.configuration_cropr_vit import per_block_schedule


def test_default_is_vit_b16_with_per_block_schedule_and_llf():
    config = CroprViTConfig()
    # The per-block schedule: 197 -> 180 -> 164 -> ... -> 36, the last block sees all 197 tokens again.
    assert config.token_counts() == [197, 180, 164, 148, 132, 116, 100, 84, 68, 52, 36, 197]
    assert config.effective_pruning_schedule == [17] + [16] * 9 + [0, 0]
    assert config.pruning_blocks == list(range(10))
    assert config.token_counts(pruned=False) == [197] * 12


def test_schedule_without_llf_prunes_after_every_block_but_the_last():
    config = CroprViTConfig(last_layer_fusion=False, pruning_rate=8)
    assert config.effective_pruning_schedule == [9] + [8] * 10 + [0]
    assert config.token_counts()[-1] == 197 - 9 - 8 * 10


def test_without_cls_the_first_module_prunes_exactly_the_rate():
    config = CroprViTConfig(use_cls_token=False, pruning_rate=16)
    assert config.effective_pruning_schedule[0] == 16
    assert config.token_counts()[:3] == [196, 180, 164]


def test_stage_schedule():
    schedule = [0] * 5 + [50] + [0] * 5 + [50] + [0] * 5 + [50] + [0] * 6
    config = CroprViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, pruning_schedule=schedule)
    assert config.pruning_blocks == [5, 11, 17]
    counts = config.token_counts()
    assert counts[5] == 197 and counts[6] == 147 and counts[12] == 97 and counts[18] == 47 and counts[-1] == 197


def test_flops_match_the_design_formula_and_ceilings():
    config = CroprViTConfig()
    width, tokens = 768, 197
    per_block = 12 * tokens * width**2 + 2 * tokens**2 * width
    patch_embedding = 196 * 3 * 16 * 16 * width
    assert config.flops(pruned=False) == 12 * per_block + patch_embedding
    # The FLOP ceilings: ViT-B/16 R=16 + LLF ~ 1.62x, ViT-L/16 R=8 + LLF ~ 1.78x.
    assert config.flop_ceiling() == pytest.approx(1.62, abs=0.01)
    large = CroprViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, pruning_rate=8)
    assert large.flop_ceiling() == pytest.approx(1.78, abs=0.01)
    assert CroprViTConfig(token_selector="none").flop_ceiling() == 1.0


def test_patch_keep_counts_scale_with_fraction_and_resolution():
    config = CroprViTConfig()
    assert config.patch_keep_counts()[:2] == [179, 163]
    assert config.patch_keep_counts(fraction=0.0)[:10] == [196] * 10
    # At 448 px (784 patches) each module removes the same share of patches as at 224 px.
    counts = config.patch_keep_counts(num_patches=784)
    assert counts[0] == 784 - 68 and counts[9] == pytest.approx(4 * 35, abs=4)
    # A schedule that nearly empties 224 px still fits a smaller image: one patch stays.
    assert min(CroprViTConfig(pruning_rate=19).patch_keep_counts(num_patches=16)) >= 1


def test_json_round_trip_keeps_the_schedule(tmp_path):
    config = CroprViTConfig(**tiny_config_kwargs(pruning_schedule=[2, 3, 0, 0], token_selector="variance"))
    config.save_pretrained(tmp_path)
    loaded = CroprViTConfig.from_pretrained(tmp_path)
    assert loaded.effective_pruning_schedule == [2, 3, 0, 0]
    assert loaded.token_selector == "variance"
    assert loaded.num_labels == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pruning_rate": 20}, "removes 201 tokens"),
        ({"pruning_schedule": [1, 2]}, "one entry per block (12), got 2"),
        ({"pruning_schedule": [1] + [0] * 10 + [4]}, "after the last block"),
        ({"pruning_schedule": [1] * 11 + [0]}, "penultimate"),
        ({"pruning_schedule": [-1] + [0] * 11}, ">= 0"),
        ({"pruning_rate": -1}, "`pruning_rate` must be >= 0, got -1"),
        ({"token_selector": "magic"}, "`token_selector` must be one of"),
        ({"pooling": "max"}, "`pooling` must be one of"),
        ({"pooling": "cls", "use_cls_token": False}, "needs `use_cls_token=True`"),
        ({"hidden_size": 100}, "`hidden_size` (100) must be a multiple of `num_attention_heads` (12)"),
        ({"image_size": 230}, "not divisible by `patch_size`"),
        ({"num_queries": 0}, "`num_queries` must be >= 1, got 0"),
        ({"aux_loss_weight": -0.5}, "`aux_loss_weight` must be >= 0"),
        ({"drop_path_rate": 1.5}, "`drop_path_rate` must be in [0, 1)"),
        ({"hidden_act": "nope"}, "`hidden_act` 'nope' is unknown"),
        ({"num_hidden_layers": 0}, "`num_hidden_layers` must be >= 1"),
    ],
)
def test_invalid_values_raise_value_error_naming_field_and_numbers(overrides, message):
    with pytest.raises(ValueError) as error:
        CroprViTConfig(**overrides)
    assert message in str(error.value)


def test_mutated_config_is_checked_again_by_the_model():
    from cropr import CroprViTModel

    config = CroprViTConfig(**tiny_config_kwargs())
    config.pruning_rate = 50
    with pytest.raises(ValueError, match="removes"):
        CroprViTModel(config)


def test_per_block_schedule_spreads_the_removal_over_all_but_the_last_two_blocks():
    assert per_block_schedule(12, 64, 0.85) == [6, 6, 6, 6, 5, 5, 5, 5, 5, 5, 0, 0]
    assert per_block_schedule(4, 16, 0.85) == [7, 7, 0, 0]
    assert per_block_schedule(4, 16, 0.85, last_layer_fusion=False) == [5, 5, 4, 0]
    with pytest.raises(ValueError, match="removed_fraction"):
        per_block_schedule(12, 64, 1.0)


def test_per_block_schedule_can_put_its_modules_after_the_first_blocks_only():
    assert per_block_schedule(6, 196, 0.8, num_modules=3) == [53, 52, 52, 0, 0, 0]
    assert per_block_schedule(6, 196, 0.8, num_modules=4) == per_block_schedule(6, 196, 0.8)
    for num_modules in (0, 5):
        with pytest.raises(ValueError, match="`num_modules` must be from 1 to 4 for 6 blocks"):
            per_block_schedule(6, 196, 0.8, num_modules=num_modules)


@pytest.mark.parametrize(
    ("ignored", "message"),
    [([5], r"class ids in \[0, 4\].*got \[5\]"), ([-1, 2], r"got \[-1\]"), ([0, 1, 2, 3, 4], "ignores all 5 classes")],
)
def test_aux_ignored_labels_must_be_some_of_the_classes(ignored, message):
    with pytest.raises(ValueError, match=message):
        CroprViTConfig(**tiny_config_kwargs(aux_ignored_labels=ignored))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aux_loss_weight": float("nan")}, "`aux_loss_weight` must be >= 0 and finite, got nan"),
        ({"aux_loss_weight": float("inf")}, "`aux_loss_weight` must be >= 0 and finite, got inf"),
        ({"layer_norm_eps": 0.0}, "`layer_norm_eps` must be > 0 and finite, got 0.0"),
        ({"layer_norm_eps": -1e-6}, "`layer_norm_eps` must be > 0 and finite, got -1e-06"),
        ({"num_labels": 0}, "`num_labels` must be >= 1"),
    ],
)
def test_non_finite_and_empty_values_are_refused(overrides, message):
    with pytest.raises(ValueError) as error:
        CroprViTConfig(**tiny_config_kwargs(**overrides))
    assert message in str(error.value)


@pytest.mark.parametrize("head", ["classification", "multi_label", "segmentation"])
def test_task_heads_refuse_zero_labels(head):
    from conftest import build_tiny

    with pytest.raises(ValueError, match="`num_labels` must be >= 1"):
        build_tiny(head, num_labels=0)


def test_overrides_given_to_from_pretrained_are_validated(tmp_path):
    CroprViTConfig(**tiny_config_kwargs()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"removes 201 tokens"):
        CroprViTConfig.from_pretrained(tmp_path, pruning_rate=100)
    with pytest.raises(ValueError, match="aux_loss_weight"):
        CroprViTConfig.from_pretrained(tmp_path, aux_loss_weight=float("nan"))


def test_misspelled_keys_warn_with_the_closest_field(tmp_path):
    with pytest.warns(UserWarning, match=r"`pruning_rat` is not a CroprViTConfig field.*did you mean `pruning_rate`"):
        config = CroprViTConfig(**tiny_config_kwargs(pruning_rat=3))
    assert config.pruning_rate == 3  # the tiny preset's own rate: the misspelled key changed nothing
    CroprViTConfig(**tiny_config_kwargs()).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"`token_selecter`.*the override is ignored; did you mean `token_selector`"):
        CroprViTConfig.from_pretrained(tmp_path, token_selecter="none")
    with pytest.warns(UserWarning, match=r"`zzz_unrelated` is not a CroprViTConfig field.*nothing reads it\.$"):
        CroprViTConfig(zzz_unrelated=1)


def test_model_from_pretrained_names_the_field_a_misspelled_override_meant(tmp_path):
    from cropr import CroprViTForImageClassification

    CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs())).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"`last_layer_fuson`.*did you mean `last_layer_fusion`"):
        with pytest.raises(TypeError, match="last_layer_fuson"):
            CroprViTForImageClassification.from_pretrained(tmp_path, last_layer_fuson=False)
