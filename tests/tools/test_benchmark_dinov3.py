"""The benchmark's DINOv3 preset: transformers' `DINOv3ViTModel` as the `hf` baseline, equal to CroprViT with pruning
off on the same weights (rotary embeddings, registers, the key projection without bias)."""

import torch

from cropr.tools.benchmark import BenchmarkOptions, build_inference_models, check_outputs

SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=2, intermediate_size=64)


def test_dinov3_preset_baseline_equals_the_unpruned_model():
    options = BenchmarkOptions(preset="dinov3-s16", overrides={**SMALL, "num_hidden_layers": 4, "pruning_rate": 3})
    inference = build_inference_models(options)
    assert type(inference.models["hf"]).__name__ == "DINOv3ViTModel"
    assert inference.config.num_prefix_tokens == 5 and inference.config.position_embedding_type == "rope"
    checks = check_outputs(inference.models, inference.config, torch.randn(2, 3, 32, 32))
    assert checks["none"]["max_abs_diff_vs_hf"] < 1e-5
    assert checks["cropr"]["shape"] == [2, 21, 32]


def test_ideal_variant_rotates_like_the_model():
    """The free-routing timing reference does the model's work: with nothing to prune it equals `none`."""
    overrides = {**SMALL, "num_hidden_layers": 3, "pruning_schedule": [0, 0, 0]}
    inference = build_inference_models(BenchmarkOptions(preset="dinov3-s16", overrides=overrides))
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ideal = inference.models["ideal"](pixel_values)
        none = inference.models["none"](pixel_values)
    torch.testing.assert_close(ideal.last_hidden_state, none.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(ideal.pooler_output, none.pooler_output, rtol=0, atol=1e-6)
