"""`CroprViTBackbone`: transformers' backbone interface, full feature maps after pruning, the detection aux loss."""

import pytest
import torch
from conftest import SHARED_DATA, tiny_config_kwargs
from transformers import AutoBackbone, Dinov2Backbone, Dinov2Config, Dinov2Model

from cropr import CroprViTBackbone, CroprViTConfig, CroprViTModel, from_backbone

ATOL = 1e-4
ALL_STAGES = [0, 1, 2, 3, 4]


def pixels(size: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Distinct random values for every parameter, so that a mapping mix-up changes the outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter == 1).float())
    return model.eval()


def converted_backbone_folder(source_folder, destination, **overrides) -> None:
    model, _ = from_backbone(source_folder, "feature-extraction", token_selector="none", **overrides)
    model.save_pretrained(destination)


@pytest.fixture(scope="module")
def dinov2_pair(tmp_path_factory):
    """A random tiny DINOv2 checkpoint and its unpruned CroprViT conversion, both saved."""
    source = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, layerscale_value=0.1
    )
    randomize(Dinov2Model(config)).save_pretrained(source)
    converted = tmp_path_factory.mktemp("converted")
    converted_backbone_folder(source, converted)
    return source, converted


@torch.no_grad()
@pytest.mark.parametrize(
    "options",
    [{}, {"apply_layernorm": False}, {"reshape_hidden_states": False}],
    ids=["default", "no-layernorm", "tokens"],
)
def test_unpruned_feature_maps_equal_dinov2_backbone(dinov2_pair, options):
    source, converted = dinov2_pair
    expected_model = Dinov2Backbone.from_pretrained(source, out_indices=ALL_STAGES, **options).eval()
    # (transformers' `AutoBackbone.from_pretrained` asks the Hub about every name, even a local folder: offline, the
    # class is used directly; heads build their backbone with `AutoBackbone.from_config`.)
    model = CroprViTBackbone.from_pretrained(converted, out_indices=ALL_STAGES, **options).eval()
    assert isinstance(AutoBackbone.from_config(model.config), CroprViTBackbone)
    assert model.out_features == expected_model.out_features and model.channels == expected_model.channels
    for size in (32, 48):
        expected = expected_model(pixels(size)).feature_maps
        maps = model(pixels(size)).feature_maps
        assert len(maps) == len(expected) == 5
        for feature_map, reference in zip(maps, expected, strict=True):
            assert feature_map.shape == reference.shape
            assert (feature_map - reference).abs().max() < ATOL


@torch.no_grad()
def test_pretrained_dinov2_small_feature_maps(tmp_path):
    path = SHARED_DATA / "dinov2-small"
    if not (path / "model.safetensors").is_file():
        pytest.skip("the pretrained DINOv2-S/14 checkpoint is only in the development data; the random one is tested")
    stages = [3, 6, 9, 12]
    expected_model = Dinov2Backbone.from_pretrained(path, out_indices=stages).eval()
    converted_backbone_folder(path, tmp_path, image_size=224)
    model = CroprViTBackbone.from_pretrained(tmp_path, out_indices=stages).eval()
    image = pixels(224, batch=1)
    for feature_map, reference in zip(model(image).feature_maps, expected_model(image).feature_maps, strict=True):
        assert feature_map.shape == reference.shape == (1, 384, 16, 16)
        assert (feature_map - reference).abs().max() < ATOL


def latest_features_reference(hidden_states, kept_indices, pruning_blocks, stage: int) -> torch.Tensor:
    """Token by token: every position's features the last time its token was in the sequence, up to `stage`."""
    full = hidden_states[0].clone()
    raster = torch.arange(full.shape[1]).expand(full.shape[0], -1)
    positions = raster
    modules = iter(kept_indices)
    for block in range(stage):
        tokens = hidden_states[block + 1]
        current = positions if tokens.shape[1] < full.shape[1] else raster
        for image in range(full.shape[0]):
            for column, position in enumerate(current[image].tolist()):
                full[image, position] = tokens[image, column]
        if block in pruning_blocks:
            positions = next(modules)
    return full


@torch.no_grad()
@pytest.mark.parametrize("last_layer_fusion", [True, False])
def test_pruned_stages_are_full_grids_of_latest_features(last_layer_fusion):
    config = CroprViTConfig(
        **tiny_config_kwargs(pruning_rate=3, last_layer_fusion=last_layer_fusion, token_selector="variance"),
        out_indices=ALL_STAGES,
        reshape_hidden_states=False,
        apply_layernorm=False,
    )
    torch.manual_seed(0)
    backbone = CroprViTBackbone(config).eval()
    model = CroprViTModel(config).eval()
    model.load_state_dict(backbone.state_dict())
    images = pixels()
    reference = model(images, output_hidden_states=True, output_kept_indices=True)
    maps = backbone(images).feature_maps
    for stage, feature_map in enumerate(maps):
        expected = latest_features_reference(
            reference.hidden_states, reference.kept_indices, config.pruning_blocks, stage
        )
        assert torch.equal(feature_map, expected), stage
    # Asked alone, a late stage still holds the tokens set aside at earlier, unrequested stages.
    backbone.out_indices = [3]
    (alone,) = backbone(images).feature_maps
    assert torch.equal(alone, maps[3])
    # Set-aside tokens keep the features they had when set aside: the last two stages differ only where tokens were
    # still kept (pruning happens after blocks 0 and 1 of 4 here, or 0, 1, 2 without Last Layer Fusion).
    if last_layer_fusion:
        assert torch.allclose(backbone.layernorm(maps[-1]), reference.last_hidden_state, atol=1e-6)
    else:
        unchanged = (maps[-1] == maps[-2]).all(dim=-1)
        assert unchanged.sum(dim=1).tolist() == [16 - config.patch_keep_counts()[-2]] * 2


def test_training_returns_aux_logits_and_the_multi_hot_aux_loss_trains_only_the_routers():
    config = CroprViTConfig(**tiny_config_kwargs(pruning_rate=3), out_indices=[2, 4])
    backbone = CroprViTBackbone(config).train()
    output = backbone(pixels())
    assert [tuple(feature_map.shape) for feature_map in output.feature_maps] == [(2, 32, 4, 4)] * 2
    assert len(output.aux_logits) == len(config.pruning_blocks)
    loss = backbone.auxiliary_loss(output.aux_logits, [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)])
    loss.backward()
    router = backbone.token_selector.routers[str(config.pruning_blocks[0])]
    assert router.queries.grad is not None and router.queries.grad.abs().sum() > 0
    assert backbone.embeddings.projection.weight.grad is None
    # The target is multi-hot: a perfect prediction of classes {1, 3} and none for the empty image has a small loss.
    perfect = torch.full((2, 1, 5), -20.0)
    perfect[0, 0, [1, 3]] = 20.0
    assert backbone.auxiliary_loss((perfect,), [torch.tensor([1, 3]), torch.tensor([])]) < 1e-6
    with pytest.raises(ValueError, match=r"class ids in \[0, 4\]"):
        backbone.auxiliary_loss(output.aux_logits, [torch.tensor([5]), torch.tensor([0])])
    with pytest.raises(ValueError, match="2 images"):
        backbone.auxiliary_loss(output.aux_logits, [torch.tensor([1])])
    assert backbone.eval()(pixels()).aux_logits is None
    assert backbone.auxiliary_loss(None, [torch.tensor([1])]) is None


def test_out_features_are_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="out_indices must be valid indices"):
        CroprViTConfig(**tiny_config_kwargs(), out_indices=[7])
    config = CroprViTConfig(**tiny_config_kwargs(), out_features=["stage2", "stage4"])
    assert config.out_indices == [2, 4] and config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    CroprViTBackbone(config).save_pretrained(tmp_path)
    reloaded = CroprViTBackbone.from_pretrained(tmp_path)
    assert reloaded.out_features == ["stage2", "stage4"]
    # A CroprViT checkpoint without backbone settings gives the last stage, as transformers' backbones do.
    assert CroprViTConfig(**tiny_config_kwargs()).out_features == ["stage4"]
