"""The backbone variants of the pretrained families (prefix tokens, rotary embeddings, gated MLP, head poolings): each
is off by default, checked when set, and never prunes a prefix token. Their exactness against transformers' models is
tested in tests/test_conversion_families.py."""

import pytest
import torch
from conftest import build_tiny, tiny_config_kwargs

from cropr import CroprViTConfig, CroprViTModel
from cropr.models.cropr_vit.modeling_cropr_vit import rotary_position_table

VARIANTS = dict(
    use_distillation_token=True,
    num_register_tokens=3,
    position_embedding_type="rope",
    use_gated_mlp=True,
    hidden_act="silu",
)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_register_tokens": -1}, r"`num_register_tokens` must be >= 0, got -1"),
        ({"use_distillation_token": True, "use_cls_token": False}, "needs `use_cls_token=True`"),
        ({"pooling": "cls_distillation"}, "needs `use_distillation_token=True`"),
        ({"pooling": "cls_patch_mean", "use_cls_token": False}, 'pooling="cls_patch_mean"` needs `use_cls_token'),
        ({"position_embedding_type": "alibi"}, r"`position_embedding_type` must be one of \('absolute', 'rope'\)"),
        (
            {"position_embedding_type": "rope", "hidden_size": 36, "num_attention_heads": 6},
            "head width divisible by 4 .* is 6",
        ),
        ({"position_embedding_type": "rope", "rope_theta": 0}, "`rope_theta` must be > 0"),
    ],
)
def test_variant_values_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CroprViTConfig(**tiny_config_kwargs(**fields))


def test_defaults_build_the_plain_vit():
    config = CroprViTConfig(**tiny_config_kwargs())
    assert config.num_prefix_tokens == 1 and config.pooled_size == 32
    names = set(CroprViTModel(config).state_dict())
    assert not any("distillation" in name or "register" in name or "gate_proj" in name for name in names)
    assert "embeddings.position_embeddings" in names


@torch.no_grad()
@pytest.mark.parametrize("last_layer_fusion", [True, False])
def test_prefix_tokens_are_always_kept_in_front(last_layer_fusion):
    model = build_tiny("base", last_layer_fusion=last_layer_fusion, **VARIANTS).eval()
    config = model.config
    assert config.num_prefix_tokens == 5 and config.token_counts()[:3] == [21, 17, 14]
    assert "embeddings.position_embeddings" not in model.state_dict()
    outputs = model(torch.randn(3, 3, 32, 32), output_kept_indices=True)
    for kept in outputs.kept_indices:
        assert torch.equal(kept[:, :5], torch.arange(5).expand(3, -1))
        assert bool((kept[:, 5:] >= 5).all())
    expected_tokens = 21 if last_layer_fusion else 5 + config.patch_keep_counts()[config.pruning_blocks[-1]]
    assert outputs.last_hidden_state.shape == (3, expected_tokens, 32)


def test_segmentation_reads_the_patch_tokens_after_every_prefix_token():
    model = build_tiny("segmentation", num_register_tokens=2, use_distillation_token=True).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
        patches = model.cropr_vit.layernorm(outputs.hidden_states[-1])[:, 4:]
        expected = model.decode_head(patches).transpose(1, 2).reshape(2, 5, 4, 4)
    assert torch.equal(outputs.logits, expected)


@pytest.mark.parametrize(("pooling", "width"), [("cls_patch_mean", 64), ("cls_distillation", 64), ("cls", 32)])
def test_head_poolings(pooling, width):
    model = build_tiny("classification", pooling=pooling, use_distillation_token=True, num_register_tokens=2).eval()
    assert model.classifier.linear.in_features == width
    with torch.no_grad():
        outputs = model.cropr_vit(torch.randn(2, 3, 32, 32))
    tokens = outputs.last_hidden_state
    expected = {
        "cls_patch_mean": torch.cat([tokens[:, 0], tokens[:, 4:].mean(dim=1)], dim=1),
        "cls_distillation": torch.cat([tokens[:, 0], tokens[:, 1]], dim=1),
        "cls": tokens[:, 0],
    }[pooling]
    assert torch.equal(outputs.pooler_output, expected)


def test_a_classifier_without_norm_is_a_linear_layer():
    model = build_tiny("classification", classifier_norm=False).eval()
    assert isinstance(model.classifier.norm, torch.nn.Identity)
    assert not any(name.startswith("classifier.norm") for name in model.state_dict())


def test_flops_count_the_gated_mlp_s_third_projection():
    plain = CroprViTConfig(**tiny_config_kwargs())
    gated = CroprViTConfig(**tiny_config_kwargs(use_gated_mlp=True))
    assert gated.flops() - plain.flops() == sum(plain.token_counts()) * 32 * 64
    assert gated.flops(pruned=False) - plain.flops(pruned=False) == 4 * 17 * 32 * 64


def test_rotary_model_trains_with_gradient_checkpointing():
    torch.manual_seed(0)
    model = build_tiny("classification", **VARIANTS).train()
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 4])
    torch.manual_seed(1)
    model(pixel_values, labels=labels).loss.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    torch.manual_seed(1)
    model(pixel_values, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], atol=1e-6), name


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_blocks_rotate_each_token_by_its_place_on_a_non_square_grid(dtype):
    """Unpruned, a rotary model is its blocks run by hand with the rotary table of the input's 4 x 6 patch grid (a
    36 x 52 image: the patch embedding drops the remainder), in the model's dtype (a table of the wrong grid, or none,
    changes the output; one left in float32 promotes the queries and keys of a bfloat16 model)."""
    model = build_tiny(
        "base", image_size=(32, 48), position_embedding_type="rope", num_register_tokens=2, token_selector="none"
    )
    model = model.eval().to(dtype)
    pixel_values = torch.randn(2, 3, 36, 52, dtype=dtype)
    hidden_states = model.embeddings(pixel_values, True)
    rotary = tuple(table.unsqueeze(0) for table in rotary_position_table(model.config, (4, 6), "cpu", dtype))
    for layer in model.layers:
        hidden_states, _ = layer(hidden_states, rotary=rotary)
    output = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
    assert output.dtype == dtype
    assert torch.equal(output, model.layernorm(hidden_states))


@torch.no_grad()
def test_a_pruned_rotary_model_without_fusion_rotates_the_kept_tokens_unasked():
    """Without Last Layer Fusion and without `output_kept_indices`, the kept tokens' positions are still tracked for
    their rotary angles."""
    model = build_tiny("base", position_embedding_type="rope", last_layer_fusion=False).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    tracked = model(pixel_values, output_kept_indices=True)
    assert torch.equal(model(pixel_values).last_hidden_state, tracked.last_hidden_state)


@torch.no_grad()
def test_rotary_tables_are_made_on_the_models_device():
    # The meta device stands in for an accelerator: a table made on the CPU would meet meta queries and raise.
    model = build_tiny("base", position_embedding_type="rope").to("meta").eval()
    assert model(torch.empty(2, 3, 32, 32, device="meta")).last_hidden_state.device.type == "meta"
