"""Each supported source family into CroprViT, exactly: random tiny configs of transformers' own classes, saved and
converted, compared with the source (hidden states, pooled output, kept classifier's logits) at the native size and
at another size; rotary position embeddings through pruning; a short fine-tuning run per family."""

import pytest
import torch
from PIL import Image
from test_conversion import TINY, images, max_diff, randomize
from transformers import (
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    ViTConfig,
    ViTForImageClassification,
    pipeline,
)

from cropr import CroprViTForImageClassification
from cropr.conversion import from_backbone

ATOL = 1e-4
LABELS = {0: "ant", 1: "bee", 2: "cat"}
HEAD = dict(id2label=LABELS, label2id={name: index for index, name in LABELS.items()})
DINOV3 = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_register_tokens=2,
    layerscale_value=0.1,
)

SOURCES = {
    "vit": lambda: ViTForImageClassification(ViTConfig(intermediate_size=64, layer_norm_eps=1e-12, **TINY, **HEAD)),
    "deit": lambda: DeiTForImageClassification(DeiTConfig(intermediate_size=64, **TINY, **HEAD)),
    "deit_distilled": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(intermediate_size=64, **TINY, **HEAD)),
    "dinov2": lambda: Dinov2ForImageClassification(Dinov2Config(mlp_ratio=2, layerscale_value=0.1, **TINY, **HEAD)),
    "dinov2_swiglu": lambda: Dinov2ForImageClassification(Dinov2Config(use_swiglu_ffn=True, **TINY, **HEAD)),
    "dinov2_with_registers": lambda: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=3, layerscale_value=0.1, **TINY, **HEAD)
    ),
    "dinov3_vit": lambda: DINOv3ViTModel(DINOv3ViTConfig(**DINOV3)),
    "dinov3_vit_gated": lambda: DINOv3ViTModel(DINOv3ViTConfig(use_gated_mlp=True, hidden_act="silu", **DINOV3)),
}
ASKS_TO_INTERPOLATE = ("vit", "deit", "deit_distilled")
# Families whose base model pools the CLS token (ViT's and DeiT's pooler, a dense layer + tanh, is not converted).
POOLS_CLS = ("dinov2", "dinov2_swiglu", "dinov2_with_registers", "dinov3_vit", "dinov3_vit_gated")


@pytest.fixture(scope="module", params=list(SOURCES))
def saved_source(request, tmp_path_factory):
    model = randomize(SOURCES[request.param]())
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


def interpolation(family: str, size: int) -> dict:
    """ViT and DeiT take another size only when asked (the converted models too); the DINO families always do."""
    return {"interpolate_pos_encoding": True} if family in ASKS_TO_INTERPOLATE and size != 32 else {}


@torch.no_grad()
@pytest.mark.parametrize("size", [32, 48, 24])
def test_unpruned_conversion_matches_the_source(saved_source, size):
    family, source, directory = saved_source
    pixel_values, interpolate = images(size), interpolation(family, size)
    has_head = not family.startswith("dinov3")
    task = "image-classification" if has_head else "feature-extraction"
    model, _ = from_backbone(directory, task, token_selector="none")
    model.eval()
    base_output = (source.base_model if has_head else source)(pixel_values, **interpolate)
    converted = model.base_model(pixel_values, **interpolate)
    assert max_diff(converted.last_hidden_state, base_output.last_hidden_state) < ATOL
    if has_head:
        assert model.config.id2label == LABELS and not model.config.classifier_norm
        assert max_diff(model(pixel_values, **interpolate).logits, source(pixel_values, **interpolate).logits) < ATOL
    if family in POOLS_CLS:
        features, _ = from_backbone(directory, "feature-extraction", token_selector="none", pooling="cls")
        pooled = features.eval()(pixel_values).pooler_output
        assert max_diff(pooled, base_output.pooler_output) < ATOL


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embeddings through pruning
# ----------------------------------------------------------------------------------------------------------------------
def reference_pruned_forward(source, pixel_values, kept_indices, pruning_blocks, num_prefix, last_layer_fusion):
    """DINOv3 (transformers' own blocks) run on the tokens the CroprViT kept, each with the rotary angle of its
    original position: the tokens are updated in place in the full token map, the set-aside ones wait there, and with
    Last Layer Fusion the last block sees every token in raster order."""
    state = source.embeddings(pixel_values)
    cos, sin = source.rope_embeddings(pixel_values)
    batch_size, num_tokens, width = state.shape
    positions = torch.arange(num_tokens).expand(batch_size, -1)
    kept = iter(kept_indices)
    last_block = len(source.model.layer) - 1
    for block, layer in enumerate(source.model.layer):
        if block == last_block and last_layer_fusion:
            positions = torch.arange(num_tokens).expand(batch_size, -1)
        index = positions.unsqueeze(-1).expand(-1, -1, width)
        patch_positions = positions[:, num_prefix:] - num_prefix
        rotary = (cos[patch_positions].unsqueeze(1), sin[patch_positions].unsqueeze(1))
        output = layer(state.gather(1, index), position_embeddings=rotary)
        state = state.scatter(1, index, output)
        if block in pruning_blocks:
            positions = next(kept)
    if not last_layer_fusion:
        state = state.gather(1, positions.unsqueeze(-1).expand(-1, -1, width))
    return source.norm(state)


@torch.no_grad()
@pytest.mark.parametrize("last_layer_fusion", [True, False])
@pytest.mark.parametrize("size", [32, 48])
def test_rotary_angles_follow_the_kept_tokens(tmp_path, last_layer_fusion, size):
    source = randomize(DINOv3ViTModel(DINOv3ViTConfig(**DINOV3)))
    source.save_pretrained(tmp_path)
    model, _ = from_backbone(
        tmp_path, "feature-extraction", token_selector="cropr", pruning_rate=3, last_layer_fusion=last_layer_fusion
    )
    model.eval()
    pixel_values = images(size, batch=3)
    outputs = model(pixel_values, output_kept_indices=True)
    kept = outputs.kept_indices
    # Each image keeps its own patches, in score order: positions differ from raster order and across the batch.
    assert not torch.equal(kept[-1][0], kept[-1][1])
    assert not torch.equal(kept[-1][0], kept[-1][0].sort().values)
    expected = reference_pruned_forward(
        source, pixel_values, kept, model.config.pruning_blocks, model.config.num_prefix_tokens, last_layer_fusion
    )
    assert outputs.last_hidden_state.shape == expected.shape
    assert max_diff(outputs.last_hidden_state, expected) < ATOL


# ----------------------------------------------------------------------------------------------------------------------
# Which head the converted model gets
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dinov2_classifier(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dinov2-classifier")
    randomize(SOURCES["dinov2"]()).save_pretrained(directory)
    return directory


def test_other_labels_get_a_new_head(dinov2_classifier):
    kept, _ = from_backbone(dinov2_classifier, pruning_rate=2)
    assert kept.config.pooling == "cls_patch_mean" and kept.config.id2label == LABELS
    assert kept.classifier.linear.weight.shape == (3, 64)
    for labels in ({"num_labels": 5}, {"id2label": {0: "x", 1: "y", 2: "z"}}, {"num_labels": 3, "keep_head": False}):
        new, _ = from_backbone(dinov2_classifier, pruning_rate=2, **labels)
        assert new.config.pooling == "avg" and new.config.classifier_norm
        assert new.classifier.linear.weight.shape[1] == 32
        assert not torch.equal(new.classifier.linear.bias, kept.classifier.linear.bias)
    # A pooling of its own means a new head; with the kept one it is refused.
    new, _ = from_backbone(dinov2_classifier, num_labels=5, pruning_rate=2, pooling="cls")
    assert new.config.pooling == "cls"
    with pytest.raises(ValueError, match="reads `pooling='cls_patch_mean'`"):
        from_backbone(dinov2_classifier, pruning_rate=2, pooling="cls")


def test_keeping_a_head_that_cannot_be_kept_is_refused(dinov2_classifier, tmp_path):
    with pytest.raises(ValueError, match="`num_labels=5` differs from the source's 3"):
        from_backbone(dinov2_classifier, num_labels=5, pruning_rate=2, keep_head=True)
    with pytest.raises(ValueError, match="'semantic-segmentation' is not 'image-classification'"):
        from_backbone(dinov2_classifier, "semantic-segmentation", num_labels=3, pruning_rate=2, keep_head=True)
    randomize(Dinov2Model(Dinov2Config(**TINY))).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no image classifier CroprViT keeps .*Dinov2ForImageClassification"):
        from_backbone(tmp_path, num_labels=3, pruning_rate=2, keep_head=True)
    with pytest.raises(ValueError, match="needs `num_labels` or `id2label`"):
        from_backbone(tmp_path, pruning_rate=2)


@torch.no_grad()
def test_model_objects_keep_their_head():
    source = randomize(SOURCES["deit_distilled"]())
    model, _ = from_backbone(source, token_selector="none")
    assert model.config.pooling == "cls_distillation"
    assert max_diff(model.eval()(images(32)).logits, source(images(32)).logits) < ATOL


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning a converted model end to end
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["deit_distilled", "dinov2_with_registers", "dinov3_vit_gated"])
def test_converted_model_trains_saves_and_classifies(family, tmp_path):
    randomize(SOURCES[family]()).save_pretrained(tmp_path / "source")
    labels = {} if family in ("deit_distilled", "dinov2_with_registers") else {"id2label": LABELS}
    model, processor = from_backbone(tmp_path / "source", token_selector="cropr", pruning_rate=3, **labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        outputs = model(images(32), labels=torch.tensor([0, 2]))
        assert torch.isfinite(outputs.loss) and outputs.aux_loss is not None
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(images(32)).logits
    model.save_pretrained(tmp_path / "converted")
    processor.save_pretrained(tmp_path / "converted")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "converted").eval()
    assert type(reloaded) is CroprViTForImageClassification
    with torch.no_grad():
        assert torch.equal(reloaded(images(32)).logits, logits)
    classifier = pipeline("image-classification", model=str(tmp_path / "converted"))
    image = Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy())
    predictions = classifier(image, top_k=3)
    assert sorted(prediction["label"] for prediction in predictions) == sorted(LABELS.values())


def test_convert_command_keeps_the_head(dinov2_classifier, tmp_path, capsys):
    from cropr.cli import main

    output = tmp_path / "converted"
    assert main(["convert", str(dinov2_classifier), "--pruning-rate", "2", "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "the source's classifier is kept: 3 labels, pooling 'cls_patch_mean'" in printed
    assert f"its Cropr modules are untrained: calibrate them (`cropr calibrate {output} --images DIR" in printed
    argv = ["convert", str(dinov2_classifier), "--pruning-rate", "2", "--token-selector", "random"]
    assert main([*argv, "--output-dir", str(output)]) == 0
    assert "untrained" not in capsys.readouterr().out  # nothing to train
    assert CroprViTForImageClassification.from_pretrained(output).config.id2label == LABELS
    argv = ["convert", str(dinov2_classifier), "--num-labels", "4", "--keep-head", "--output-dir", str(output)]
    assert main(argv) == 1
    assert "`num_labels=4` differs from the source's 3" in capsys.readouterr().err
