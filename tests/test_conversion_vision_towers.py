"""CLIP and SigLIP vision towers into CroprViT: exactness against transformers' own classes, the kept classifier,
the refusals, and a short fine-tuning run per family."""

import pytest
import torch
from test_conversion import ATOL, images, max_diff, randomize
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Siglip2Config,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    pipeline,
)

from cropr import CroprViTForImageClassification, CroprViTForSemanticSegmentation
from cropr.conversion import from_backbone

# A 4-block, 32-wide tower on 32x32 images with 8x8 patches; the text towers of the composite models are one block.
VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
LABELS = {0: "cat", 1: "dog", 2: "car"}


def vision_tower_of(model):
    """The module computing the vision tower's outputs in a source model (itself for the *VisionModel classes)."""
    return getattr(model, "vision_model", model)


SOURCES = {
    "clip_vision_model": lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)),
    "clip_vision_model_with_projection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)),
    "clip": lambda: CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT)),
    "siglip_vision_model": lambda: SiglipVisionModel(SiglipVisionConfig(**VISION)),
    "siglip": lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)),
}
CLASSIFIERS = {
    "clip": lambda: CLIPForImageClassification(CLIPConfig(vision_config=VISION, text_config=TEXT, id2label=LABELS)),
    "siglip": lambda: SiglipForImageClassification(
        SiglipConfig(vision_config=VISION, text_config=TEXT, id2label=LABELS)
    ),
}


def saved(model: torch.nn.Module, directory) -> torch.nn.Module:
    randomize(model).save_pretrained(directory)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Exactness without pruning
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("model_type", list(SOURCES))
def test_unpruned_tower_matches_source(model_type, tmp_path):
    """last_hidden_state and pooler_output (CLIP: post-LayerNorm CLS; SigLIP: attention pooling) at the native size
    and, interpolated, at another size."""
    source = vision_tower_of(saved(SOURCES[model_type](), tmp_path))
    model, _ = from_backbone(tmp_path, "feature-extraction", token_selector="none")
    model.eval()
    expected_pooling = "cls" if model_type.startswith("clip") else "map"
    assert model.config.pooling == expected_pooling and model.config.use_cls_token == model_type.startswith("clip")
    for size, interpolate in ((32, False), (48, True)):
        expected = source(images(size), interpolate_pos_encoding=interpolate, output_hidden_states=True)
        actual = model(images(size), interpolate_pos_encoding=interpolate, output_hidden_states=True)
        assert max_diff(actual.last_hidden_state, expected.last_hidden_state) < ATOL
        assert max_diff(actual.pooler_output, expected.pooler_output) < ATOL
        # The first hidden state is the blocks' input: after CLIP's pre-LayerNorm, as in transformers.
        assert len(actual.hidden_states) == len(expected.hidden_states)
        assert max(map(max_diff, actual.hidden_states, expected.hidden_states)) < ATOL


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_converted_at_another_size_matches_source_interpolating(family, tmp_path):
    # The position embeddings are resized once at conversion; SigLIP's have no CLS entry to keep aside.
    source = vision_tower_of(saved(SOURCES[family](), tmp_path))
    model, processor = from_backbone(tmp_path, "feature-extraction", token_selector="none", image_size=48)
    model.eval()
    assert processor.size == {"height": 48, "width": 48}
    expected = source(images(48), interpolate_pos_encoding=True)
    actual = model(images(48))
    assert max_diff(actual.last_hidden_state, expected.last_hidden_state) < ATOL
    assert max_diff(actual.pooler_output, expected.pooler_output) < ATOL


@torch.no_grad()
def test_source_size_off_the_patch_grid_must_be_chosen(tmp_path):
    # As SigLIP so400m/14 at 384 px: the source's patch embedding drops the last pixels, CroprViT needs whole patches.
    source = SiglipVisionModel(SiglipVisionConfig(**{**VISION, "image_size": 38}))
    saved(source, tmp_path)
    with pytest.raises(ValueError, match=r"not a multiple of its patch size 8x8.*Pass `image_size=\(32, 32\)`"):
        from_backbone(tmp_path, "feature-extraction", token_selector="none")
    model, _ = from_backbone(tmp_path, "feature-extraction", token_selector="none", image_size=(32, 32))
    expected = source(images(38)).last_hidden_state
    assert max_diff(model.eval()(images(38)[..., :32, :32]).last_hidden_state, expected) < ATOL


# ----------------------------------------------------------------------------------------------------------------------
# The source's classifier
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("family", list(CLASSIFIERS))
@pytest.mark.parametrize("from_folder", [True, False])
def test_source_classifier_is_kept(family, from_folder, tmp_path):
    source = saved(CLASSIFIERS[family](), tmp_path).eval()
    model, _ = from_backbone(tmp_path if from_folder else source, token_selector="none")
    model.eval()
    assert model.config.id2label == LABELS and model.config.label2id == {"cat": 0, "dog": 1, "car": 2}
    assert isinstance(model.classifier.norm, torch.nn.Identity)
    assert torch.equal(model.classifier.linear.weight, source.classifier.weight)
    for size, interpolate in ((32, False), (48, True)):
        expected = source(images(size), **({"interpolate_pos_encoding": True} if interpolate else {}))
        if family == "clip" and interpolate:
            # CLIPForImageClassification.forward takes no `interpolate_pos_encoding`: its logits from the tower.
            tower = source.vision_model(images(size), interpolate_pos_encoding=True).last_hidden_state
            expected.logits = source.classifier(tower[:, 1:].mean(dim=1))
        actual = model(images(size), interpolate_pos_encoding=interpolate)
        assert max_diff(actual.logits, expected.logits) < ATOL


@torch.no_grad()
def test_siglip_classifier_keeps_the_token_output(tmp_path):
    # SiglipForImageClassification reads the mean of the post-LayerNorm tokens; the tokens themselves stay the same.
    source = saved(CLASSIFIERS["siglip"](), tmp_path).eval()
    model, _ = from_backbone(tmp_path, token_selector="none")
    expected = source.vision_model(images(32)).last_hidden_state
    actual = model.eval().cropr_vit(images(32))
    assert max_diff(actual.last_hidden_state, expected) < ATOL
    assert max_diff(actual.pooler_output, expected.mean(dim=1)) < ATOL


def test_other_labels_give_a_new_head(tmp_path):
    saved(CLASSIFIERS["clip"](), tmp_path)
    model, _ = from_backbone(tmp_path, id2label={0: "a", 1: "b"}, token_selector="none")
    assert model.config.id2label == {0: "a", 1: "b"} and model.config.classifier_norm
    # The same labels, or only their number, keep it.
    model, _ = from_backbone(tmp_path, num_labels=3, token_selector="none")
    assert model.config.id2label == LABELS and not model.config.classifier_norm
    with pytest.raises(ValueError, match="head reads `pooling='patch_mean'`, not 'cls'"):
        from_backbone(tmp_path, pooling="cls")


# ----------------------------------------------------------------------------------------------------------------------
# Pooling choices and refusals
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_pooling_choices_of_the_towers(tmp_path):
    source = saved(SOURCES["siglip_vision_model"](), tmp_path / "siglip").eval()
    model, _ = from_backbone(tmp_path / "siglip", "feature-extraction", token_selector="none", pooling="avg")
    assert model.map_head is None
    expected = source(images(32)).last_hidden_state.mean(dim=1)
    assert max_diff(model.eval()(images(32)).pooler_output, expected) < ATOL
    with pytest.raises(ValueError, match=r'`pooling="cls"` needs `use_cls_token=True`'):
        from_backbone(tmp_path / "siglip", "feature-extraction", token_selector="none", pooling="cls")
    randomize(SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **VISION))).save_pretrained(
        tmp_path / "nohead"
    )
    model, _ = from_backbone(tmp_path / "nohead", "feature-extraction", token_selector="none")
    assert model.config.pooling == "avg"
    saved(SOURCES["clip_vision_model"](), tmp_path / "clip")
    with pytest.raises(ValueError, match="attention-pooling head"):
        from_backbone(tmp_path / "clip", "feature-extraction", token_selector="none", pooling="map")


def test_siglip2_naflex_is_refused(tmp_path):
    Siglip2Config(vision_config=VISION, text_config=TEXT).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaFlex") as error:
        from_backbone(tmp_path, num_labels=2)
    assert "'siglip'" in str(error.value) and "'clip_vision_model'" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# Pruned, without a CLS token
# ----------------------------------------------------------------------------------------------------------------------
def test_siglip_segmentation_prunes_and_restores_every_patch(tmp_path):
    saved(SOURCES["siglip_vision_model"](), tmp_path)
    model, _ = from_backbone(tmp_path, "semantic-segmentation", num_labels=3, pruning_rate=3)
    assert model.config.num_prefix_tokens == 0 and model.config.token_counts() == [16, 13, 10, 16]
    # The head reads the tokens, so the attention pooling, which nothing would train, is left out.
    assert model.config.pooling == "avg" and model.base_model.map_head is None
    model.train()
    outputs = model(images(32), labels=torch.randint(0, 3, (2, 32, 32)), output_kept_indices=True)
    assert outputs.logits.shape == (2, 3, 4, 4) and torch.isfinite(outputs.loss)
    # Without a CLS token, position 0 is a patch, which the routers may drop like any other.
    assert outputs.kept_indices[0].shape == (2, 13) and outputs.kept_indices[0].min() >= 0
    outputs.loss.backward()
    assert model.base_model.embeddings.position_embeddings.grad[0, 0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tune, save, reload, pipeline
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source_factory", "source_processor"),
    [
        (CLASSIFIERS["clip"], CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32)),
        (SOURCES["siglip_vision_model"], SiglipImageProcessorPil(size={"height": 32, "width": 32})),
    ],
    ids=["clip-with-classifier", "siglip-with-attention-pooling"],
)
def test_finetune_save_reload_pipeline(source_factory, source_processor, tmp_path):
    saved(source_factory(), tmp_path / "source")
    source_processor.save_pretrained(tmp_path / "source")
    model, processor = from_backbone(tmp_path / "source", id2label=LABELS, pruning_rate=3)
    assert model.config.pruning_blocks == [0, 1]
    # The source's resize and center crop (CLIP's shortest edge), its mean and bicubic resampling.
    converted, original = processor.to_dict(), source_processor.to_dict()
    assert converted["size"] == original["size"]
    assert bool(converted.get("do_center_crop")) == bool(original.get("do_center_crop"))
    assert converted.get("crop_size") == original.get("crop_size")
    assert list(processor.image_mean) == list(source_processor.image_mean) and processor.resample == 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        outputs = model(images(32), labels=torch.tensor([0, 2]))
        assert outputs.aux_loss is not None
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "cropr")
    processor.save_pretrained(tmp_path / "cropr")
    reloaded = CroprViTForImageClassification.from_pretrained(tmp_path / "cropr").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images(32)).logits, model(images(32)).logits)
    classify = pipeline("image-classification", model=str(tmp_path / "cropr"))
    results = classify(torch.rand(32, 32, 3).mul(255).byte().numpy(), top_k=3)
    assert sorted(result["label"] for result in results) == sorted(LABELS.values())


@torch.no_grad()
def test_segmentation_head_is_new_for_a_classifier_source(tmp_path):
    source = saved(CLASSIFIERS["clip"](), tmp_path).eval()
    model, _ = from_backbone(tmp_path, "semantic-segmentation", num_labels=2, token_selector="none")
    assert isinstance(model, CroprViTForSemanticSegmentation)
    # The head reads the tokens as the blocks leave them; the post-LayerNorm of the pooled CLS token is left out.
    assert model.config.final_layernorm == "none" and model.base_model.layernorm is None
    expected = source.vision_model(images(32)).last_hidden_state
    assert max_diff(model.eval().cropr_vit(images(32)).last_hidden_state, expected) < ATOL
