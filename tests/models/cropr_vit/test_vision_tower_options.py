"""The CroprViTConfig options of the CLIP / SigLIP vision towers on a tiny model: which modules they build, and that
they train, save and reload. Their exactness against transformers: tests/test_conversion_vision_towers.py."""

import pytest
import torch
from conftest import build_tiny

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.models.cropr_vit.modeling_cropr_vit import CroprViTAttentionPoolingHead

# SigLIP's layout (no CLS token, attention pooling) and CLIP's (pre-LayerNorm, no patch bias, LayerNorm on the pooled
# output only, bare linear classifier on the mean patch token).
SIGLIP = dict(use_cls_token=False, pooling="map", hidden_act="gelu_pytorch_tanh")
CLIP = dict(
    patch_embedding_bias=False,
    pre_layernorm=True,
    final_layernorm="pooled",
    pooling="patch_mean",
    classifier_norm=False,
    hidden_act="quick_gelu",
)


def test_defaults_build_the_vit_layout():
    config = CroprViTConfig()
    assert (config.patch_embedding_bias, config.pre_layernorm, config.final_layernorm) == (True, False, "tokens")
    model = build_tiny("classification")
    backbone = model.base_model
    assert backbone.embeddings.projection.bias is not None and backbone.pre_layernorm is None
    assert backbone.map_head is None and isinstance(model.classifier.norm, torch.nn.LayerNorm)


def test_options_build_their_modules():
    model = build_tiny("classification", **CLIP)
    backbone = model.base_model
    assert backbone.embeddings.projection.bias is None and isinstance(backbone.pre_layernorm, torch.nn.LayerNorm)
    assert isinstance(model.classifier.norm, torch.nn.Identity)
    assert "cropr_vit.layernorm.weight" in model.state_dict()
    assert "cropr_vit.layernorm.weight" not in build_tiny("classification", final_layernorm="none").state_dict()
    assert isinstance(build_tiny("classification", **SIGLIP).base_model.map_head, CroprViTAttentionPoolingHead)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"final_layernorm": "post"}, r"`final_layernorm` must be one of \('tokens', 'pooled', 'none'\)"),
        ({"pooling": "attention"}, "`pooling` must be one of"),
        ({"use_cls_token": False, "pooling": "cls"}, r'`pooling="cls"` needs `use_cls_token=True`'),
    ],
)
def test_bad_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CroprViTConfig(**fields)


@torch.no_grad()
def test_pooled_layernorm_and_patch_mean_pool_as_documented():
    model = build_tiny("base", **{**CLIP, "token_selector": "none"}).eval()
    outputs = model(torch.randn(2, 3, 32, 32))
    # `last_hidden_state` is the last block's output; only the pooled patch mean is normalised.
    assert torch.allclose(outputs.pooler_output, model.layernorm(outputs.last_hidden_state[:, 1:].mean(dim=1)))


@pytest.mark.parametrize("fields", [SIGLIP, CLIP], ids=["siglip", "clip"])
def test_pruned_options_train_save_and_reload(fields, tmp_path):
    model = build_tiny("classification", **fields)
    model.activation_checkpointing_enable()
    model.train()
    outputs = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 4]), output_hidden_states=True)
    assert len(outputs.hidden_states) == 5 and outputs.aux_loss is not None
    outputs.loss.backward()
    backbone = model.base_model
    trained = backbone.map_head.probe if backbone.map_head is not None else backbone.pre_layernorm.weight
    assert trained.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    reloaded = CroprViTForImageClassification.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
def test_attention_pooling_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from cropr.tools.export import export_onnx, run_onnx

    torch.manual_seed(0)
    model = build_tiny("classification", **SIGLIP).eval().strip_training_modules()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
    path = export_onnx(model, tmp_path / "model.onnx", batch_size=2, dynamo=False)
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, pixel_values)), expected, rtol=0, atol=1e-4)
