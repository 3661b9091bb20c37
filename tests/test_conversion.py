"""Pretrained ViT / DINOv2 checkpoints into CroprViT: `cropr.conversion` and `scripts/convert_backbone.py` (the other
families: test_conversion_families.py)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    BeitConfig,
    Dinov2Backbone,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    SegformerImageProcessorPil,
    SwinConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    ViTModel,
)

from cropr import (
    CroprViTForImageClassification,
    CroprViTForMultiLabelClassification,
    CroprViTForSemanticSegmentation,
    CroprViTModel,
)
from cropr.conversion import convert_backbone_state_dict, from_backbone, resize_position_embeddings

ATOL = 1e-4
# A 4-block, 32-wide backbone on 32x32 images with 8x8 patches (16 patches + CLS), as the other tests' tiny config.
TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (LayerNorms and layer scales included) a distinct random value, so that any mix-up in
    the name mapping changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter == 1).float())
    return model.eval()


def images(size: int | tuple[int, int], batch: int = 2, seed: int = 1) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def old_vit_name(name: str) -> str:
    """Parameter names of ViT checkpoints saved before transformers 5."""
    name = re.sub(r"layers\.(\d+)\.", r"encoder.layer.\1.", name)
    for new, old in (
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ):
        name = name.replace(new, old)
    return name


def old_dinov2_name(name: str) -> str:
    """Parameter names of DINOv2 checkpoints saved before transformers 5 (as facebook/dinov2-* on the Hub)."""
    for new, old in (
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
    ):
        name = name.replace(new, old)
    return name


def save_old_style(model: torch.nn.Module, directory, rename) -> None:
    model.config.save_pretrained(directory)
    state_dict = {rename(name): tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state_dict, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def vit_source(tmp_path_factory):
    """A random tiny ViTModel saved locally (no image processor config: random-init test model)."""
    model = randomize(ViTModel(ViTConfig(intermediate_size=64, layer_norm_eps=1e-12, **TINY)))
    directory = tmp_path_factory.mktemp("vit")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def dinov2_source(tmp_path_factory):
    """A random tiny Dinov2Model (layer scale, mlp_ratio 2) saved locally with an image processor config."""
    model = randomize(Dinov2Model(Dinov2Config(mlp_ratio=2, layerscale_value=0.1, **TINY)))
    directory = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(directory)
    ViTImageProcessorPil(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=3).save_pretrained(directory)
    return model, directory


def convert_unpruned(source, **kwargs) -> CroprViTModel:
    model, _ = from_backbone(source, "feature-extraction", token_selector="none", **kwargs)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Exactness without pruning
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_vit_unpruned_matches_source(vit_source):
    source, directory = vit_source
    model = convert_unpruned(directory)
    assert model.config.image_size_hw == (32, 32) and not model.config.interpolate_pos_encoding
    expected = source(images(32)).last_hidden_state
    assert max_diff(model(images(32)).last_hidden_state, expected) < ATOL
    # Another resolution: ViT only interpolates when asked, and so does the converted model.
    expected = source(images(48), interpolate_pos_encoding=True).last_hidden_state
    assert max_diff(model(images(48), interpolate_pos_encoding=True).last_hidden_state, expected) < ATOL


@torch.no_grad()
def test_vit_resized_at_conversion_matches_source_at_that_size(vit_source):
    source, directory = vit_source
    model = convert_unpruned(directory, image_size=(48, 40))
    assert model.config.image_size_hw == (48, 40)
    expected = source(images((48, 40)), interpolate_pos_encoding=True).last_hidden_state
    assert max_diff(model(images((48, 40))).last_hidden_state, expected) < ATOL
    # The position embeddings were resized once with transformers' own interpolation.
    embeddings = source.embeddings
    reference = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 6 * 5, 32), 48, 40)
    assert torch.allclose(model.embeddings.position_embeddings, reference, atol=1e-6)


@torch.no_grad()
def test_dinov2_unpruned_matches_source(dinov2_source):
    source, directory = dinov2_source
    model = convert_unpruned(directory)
    # Dinov2Model interpolates for any input size: the converted model does too, without being asked.
    assert model.config.interpolate_pos_encoding
    assert model.config.layerscale_value == 0.1 and model.config.intermediate_size == 64
    for size in (32, 48):
        assert max_diff(model(images(size)).last_hidden_state, source(images(size)).last_hidden_state) < ATOL
    resized = convert_unpruned(directory, image_size=48)
    assert max_diff(resized(images(48)).last_hidden_state, source(images(48)).last_hidden_state) < ATOL


def test_resize_position_embeddings_matches_dinov2(dinov2_source):
    source, _ = dinov2_source
    reference = source.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 7 * 3, 32), 56, 24)
    resized = resize_position_embeddings(source.embeddings.position_embeddings, (4, 4), (7, 3))
    assert torch.allclose(resized, reference, atol=1e-6)


@torch.no_grad()
def test_model_objects_and_head_checkpoints_are_sources(tmp_path):
    vit = randomize(ViTForImageClassification(ViTConfig(intermediate_size=64, num_labels=3, **TINY)))
    model = convert_unpruned(vit)
    assert max_diff(model(images(32)).last_hidden_state, vit.vit(images(32)).last_hidden_state) < ATOL
    dinov2 = randomize(Dinov2ForImageClassification(Dinov2Config(num_labels=3, **TINY)))
    dinov2.save_pretrained(tmp_path)
    model = convert_unpruned(tmp_path)
    assert max_diff(model(images(32)).last_hidden_state, dinov2.dinov2(images(32)).last_hidden_state) < ATOL
    backbone = Dinov2Backbone.from_pretrained(tmp_path).eval()
    model = convert_unpruned(backbone)
    assert max_diff(model(images(32)).last_hidden_state, dinov2.dinov2(images(32)).last_hidden_state) < ATOL


def test_image_processor_settings_follow_the_source(dinov2_source):
    source, directory = dinov2_source
    # A model object: its `name_or_path` folder holds the processor config.
    _, processor = from_backbone(Dinov2Model.from_pretrained(directory), num_labels=2, pruning_rate=2)
    assert list(processor.image_std) == [0.4, 0.5, 0.6] and processor.resample == 3
    # An explicit processor wins; without any, the family's defaults are used.
    explicit = ViTImageProcessorPil(image_mean=[0.2, 0.2, 0.2], image_std=[0.3, 0.3, 0.3])
    _, processor = from_backbone(source, num_labels=2, pruning_rate=2, image_processor=explicit)
    assert list(processor.image_mean) == [0.2, 0.2, 0.2] and processor.resample == explicit.resample
    _, processor = from_backbone(Dinov2Model(source.config), num_labels=2, pruning_rate=2)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and processor.resample == 3


@pytest.fixture(params=["pretrained", "random"])
def dinov2_small(request, tmp_path):
    """A DINOv2-S/14 folder: the pretrained checkpoint where the development data has it, or random weights of the
    same shape (518 px, 14 px patches, width 384, 6 heads, layer scale; 2 blocks to stay fast) saved to tmp_path."""
    if request.param == "pretrained":
        path = SHARED_DATA / "dinov2-small"
        if not (path / "model.safetensors").is_file():
            pytest.skip(
                "the pretrained DINOv2-S/14 checkpoint is only in the development data (CI has it); the random-weight "
                "case of this test converts the same shape"
            )
        return path
    config = Dinov2Config(image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=2, num_attention_heads=6)
    randomize(Dinov2Model(config)).save_pretrained(tmp_path)
    return tmp_path


@torch.no_grad()
def test_dinov2_small_matches_source(dinov2_small):
    source = Dinov2Model.from_pretrained(dinov2_small).eval()
    # Source resolution (518): the 37x37 position embeddings are kept; small inputs interpolate from them as
    # Dinov2Model does.
    model = convert_unpruned(source)
    assert model.config.image_size_hw == (518, 518)
    for size in (224, 112):
        expected = source(images(size, batch=1)).last_hidden_state
        assert max_diff(model(images(size, batch=1)).last_hidden_state, expected) < ATOL
    # Converted at 224: resized once, equal to the source fed 224 px images.
    model, processor = from_backbone(dinov2_small, "feature-extraction", token_selector="none", image_size=224)
    expected = source(images(224, batch=1)).last_hidden_state
    assert max_diff(model.eval()(images(224, batch=1)).last_hidden_state, expected) < ATOL
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and processor.size == {"height": 224, "width": 224}


# ----------------------------------------------------------------------------------------------------------------------
# Parameter names of older checkpoints
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_old_style_vit_checkpoint_loads(vit_source, tmp_path):
    source, _ = vit_source
    head = ViTForImageClassification(ViTConfig(intermediate_size=64, layer_norm_eps=1e-12, num_labels=3, **TINY))
    head.vit.load_state_dict(source.state_dict(), strict=False)
    save_old_style(head, tmp_path, old_vit_name)
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        assert "vit.encoder.layer.0.attention.attention.query.weight" in checkpoint.keys()
    model = convert_unpruned(tmp_path)
    assert max_diff(model(images(32)).last_hidden_state, source(images(32)).last_hidden_state) < ATOL


@torch.no_grad()
def test_old_style_dinov2_checkpoint_loads(dinov2_source, tmp_path):
    source, _ = dinov2_source
    save_old_style(source, tmp_path, old_dinov2_name)
    model = convert_unpruned(tmp_path)
    assert max_diff(model(images(32)).last_hidden_state, source(images(32)).last_hidden_state) < ATOL


@pytest.mark.parametrize(("family", "rename"), [("vit", old_vit_name), ("dinov2", old_dinov2_name)])
def test_state_dict_conversion_accepts_both_naming_schemes(vit_source, dinov2_source, family, rename):
    source = (vit_source if family == "vit" else dinov2_source)[0]
    new_names = source.state_dict()
    old_names = {rename(name): tensor for name, tensor in new_names.items()}
    assert old_names.keys() != new_names.keys()
    converted_new = convert_backbone_state_dict(new_names, family)
    converted_old = convert_backbone_state_dict(old_names, family)
    assert converted_new.keys() == converted_old.keys()
    CroprViTModel(convert_unpruned(source).config).load_state_dict(converted_new, strict=True)
    assert all(converted_new[name] is converted_old[name] for name in converted_new)


def test_segmentation_skips_a_background_class_in_the_auxiliary_loss_unless_told_otherwise(dinov2_source):
    _, directory = dinov2_source
    labels = {0: "cat", 1: "Background", 2: "dog"}
    model, _ = from_backbone(directory, "semantic-segmentation", id2label=labels, pruning_rate=2)
    assert model.config.aux_ignored_labels == [1]
    model, _ = from_backbone(directory, "semantic-segmentation", id2label=labels, pruning_rate=2, aux_ignored_labels=[])
    assert model.config.aux_ignored_labels == []
    model, _ = from_backbone(
        directory, "semantic-segmentation", num_labels=3, pruning_rate=2
    )  # no names: nothing to skip
    assert not model.config.aux_ignored_labels
    model, _ = from_backbone(
        directory, "image-classification", id2label=labels, pruning_rate=2
    )  # one label per image: no patches
    assert not model.config.aux_ignored_labels


# ----------------------------------------------------------------------------------------------------------------------
# Pruned heads train
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "head_class"),
    [
        ("image-classification", CroprViTForImageClassification),
        ("multi-label-classification", CroprViTForMultiLabelClassification),
        ("semantic-segmentation", CroprViTForSemanticSegmentation),
    ],
)
def test_pruned_heads_forward_and_backward(dinov2_source, task, head_class):
    _, directory = dinov2_source
    model, processor = from_backbone(directory, task, num_labels=3, token_selector="cropr", pruning_rate=2)
    assert type(model) is head_class
    config = model.config
    if task == "semantic-segmentation":
        assert config.num_queries == config.num_patches == 16 and config.last_layer_fusion
        assert isinstance(processor, SegformerImageProcessorPil) and not processor.do_reduce_labels
        labels = torch.randint(0, 3, (2, 32, 32))
    elif task == "multi-label-classification":
        labels = torch.randint(0, 2, (2, 3)).float()
    else:
        labels = torch.tensor([0, 2])
    assert config.pruning_blocks and list(processor.image_mean) == [0.1, 0.2, 0.3] and processor.resample == 3
    model.train()
    outputs = model(images(32), labels=labels)
    assert outputs.aux_loss is not None and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    backbone = model.base_model
    assert backbone.layers[0].attention.qkv_proj.weight.grad.abs().sum() > 0
    queries = next(iter(backbone.token_selector.routers.values())).queries
    assert queries.grad.abs().sum() > 0


def test_finetuned_stripped_model_round_trips(vit_source, tmp_path):
    _, directory = vit_source
    model, processor = from_backbone(
        directory, "image-classification", id2label={0: "cat", 1: "dog"}, token_selector="cropr", pruning_rate=2
    )
    assert model.config.label2id == {"cat": 0, "dog": 1}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        model(images(32), labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.strip_training_modules().eval()
    with torch.no_grad():
        logits = model(images(32)).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = CroprViTForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images(32)).logits, logits)
    reloaded_processor = ViTImageProcessorPil.from_pretrained(tmp_path)
    assert list(reloaded_processor.image_mean) == [0.5, 0.5, 0.5] and reloaded_processor.size["height"] == 32


# ----------------------------------------------------------------------------------------------------------------------
# Refusals and argument checks
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SwinConfig(embed_dim=16, depths=[1], num_heads=[1]), "'swin'"),
        (BeitConfig(**TINY), "'beit'"),
    ],
)
def test_unsupported_architectures_are_refused(tmp_path, config, message):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        from_backbone(tmp_path, num_labels=2, pruning_rate=2)
    for supported in ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit"):
        assert f"'{supported}'" in str(error.value)


def test_backbone_fields_and_labels_are_checked(vit_source):
    _, directory = vit_source
    with pytest.raises(ValueError, match="hidden_size"):
        from_backbone(directory, num_labels=2, hidden_size=64)
    with pytest.raises(ValueError, match="num_labels"):
        from_backbone(directory, "image-classification")
    with pytest.raises(ValueError, match="differs"):
        from_backbone(directory, num_labels=3, id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match="Unknown task"):
        from_backbone(directory, "object-detection", num_labels=2, pruning_rate=2)


def test_convert_script_end_to_end(vit_source, tmp_path):
    _, directory = vit_source
    output = tmp_path / "converted"
    id2label = tmp_path / "id2label.json"
    id2label.write_text(json.dumps({"0": "sky", "1": "road", "2": "car"}))
    command = [sys.executable, str(REPO_ROOT / "scripts" / "convert_backbone.py"), str(directory)]
    command += ["--task", "semantic-segmentation", "--output-dir", str(output), "--id2label", str(id2label)]
    command += ["--image-size", "48", "--pruning-rate", "4"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FLOP ceiling" in result.stdout
    assert (output / "preprocessor_config.json").is_file()
    model = CroprViTForSemanticSegmentation.from_pretrained(output).eval()
    assert model.config.num_queries == 36 and model.config.id2label[2] == "car"
    processor = SegformerImageProcessorPil.from_pretrained(output)
    assert processor.size == {"height": 48, "width": 48} and not processor.do_reduce_labels
    with torch.no_grad():
        assert model(images(48)).logits.shape == (2, 3, 6, 6)


def test_pickled_weights_are_never_loaded(vit_source, tmp_path):
    # A source folder with only a pickle checkpoint: transformers would unpickle it; the conversion refuses.
    source, _ = vit_source
    source.config.save_pretrained(tmp_path)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        from_backbone(tmp_path, "image-classification", num_labels=3)


def test_a_pruning_rate_that_no_module_uses_is_refused(vit_source, tmp_path, capsys):
    """Before: `--pruning-rate 999` on a 2-block backbone was accepted, ignored and saved as an unpruned model."""
    from cropr.cli import main

    shallow = tmp_path / "shallow"
    ViTModel(ViTConfig(intermediate_size=64, **{**TINY, "num_hidden_layers": 2})).save_pretrained(shallow)
    output = tmp_path / "converted"
    message = r"`pruning_rate=999` would not be used: a 2-block model has no block for a per-block module.*at least 3"
    argv = ["convert", str(shallow), "--num-labels", "2", "--pruning-rate", "999", "--output-dir", str(output)]
    assert main(argv) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()
    _, directory = vit_source
    with pytest.raises(ValueError, match=r"`pruning_rate=2` would not be used: `token_selector=\"none\"`"):
        from_backbone(directory, num_labels=2, token_selector="none", pruning_rate=2)
    with pytest.raises(ValueError, match=r"`pruning_schedule` \[1, 0, 0, 0\] sets every module's count"):
        from_backbone(directory, num_labels=2, pruning_schedule=[1, 0, 0, 0], pruning_rate=2)
    model, _ = from_backbone(shallow, num_labels=2, pruning_rate=0, last_layer_fusion=False)
    assert model.config.pruning_blocks == []
