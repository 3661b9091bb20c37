"""Named CroprViT shapes: the models of the paper and the small ones that train on a 2-core CPU."""

from __future__ import annotations

from typing import Any

from .models.cropr_vit.configuration_cropr_vit import CroprViTConfig

PRESETS: dict[str, dict[str, Any]] = {
    # ViT-B/16 at 224, R=16 per block + LLF: a FLOP ceiling of about 1.62x.
    "vit-b16": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    # ViT-L/16 at 224, R=8 per block + LLF (~1.78x), the paper's ImageNet model.
    "vit-l16": dict(
        image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, pruning_rate=8
    ),
    # DINOv2-S/14 at 224 (16x16 = 256 patches, layer scale), R=20 per block + LLF.
    "dinov2-s14": dict(
        image_size=224,
        patch_size=14,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        layerscale_value=1.0,
        pruning_rate=20,
    ),
    # DINOv3-S/16 at 224 (196 patches), 4 registers, 2-D rotary position embeddings, layer scale; R=16 per block + LLF
    # as ViT-B/16.
    "dinov3-s16": dict(
        image_size=224,
        patch_size=16,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        layer_norm_eps=1e-5,
        layerscale_value=1.0,
        num_register_tokens=4,
        position_embedding_type="rope",
        pruning_rate=16,
    ),
    # A SigLIP-B/16-shaped tower at 224 px: no CLS token (196 patches), attention pooling (MAP head), tanh GELU;
    # R=16 per block + LLF keeps 36 of 196 patches after block 10.
    "siglip-b16": dict(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="gelu_pytorch_tanh",
        use_cls_token=False,
        pooling="map",
    ),
    # A ViT-Tiny-shaped model on 112 px with 8 px patches (196 patches, like ViT-B/16 at 224); R=28 per block + LLF
    # keeps 27 of 196 patches by block 5.
    "vit-ti8-112": dict(
        image_size=112, patch_size=8, hidden_size=192, num_hidden_layers=8, num_attention_heads=3, pruning_rate=28
    ),
    # A model that trains from scratch in minutes on 2 CPU cores. 196 patches at 112 px, 6 blocks of width
    # 128; R=40 per block + LLF keeps 35 of 196 patches (82% pruned) after block 3.
    "vit-mini8-112": dict(
        image_size=112, patch_size=8, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, pruning_rate=40
    ),
    # For tests: 32 px, 8 px patches (16 patches), 4 blocks of width 32.
    "tiny": dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        pruning_rate=3,
    ),
}


def preset_config(name: str, **overrides: Any) -> CroprViTConfig:
    """A `CroprViTConfig` of the named shape; keyword arguments override any field."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return CroprViTConfig(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "preset_config"]
