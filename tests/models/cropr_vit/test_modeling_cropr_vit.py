import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, build_tiny, tiny_config_kwargs
from torch.overrides import TorchFunctionMode

from cropr import (
    CroprViTConfig,
    CroprViTForImageClassification,
    CroprViTForSemanticSegmentation,
    CroprViTModel,
)
from cropr.models.cropr_vit.configuration_cropr_vit import TOKEN_SELECTORS
from cropr.models.cropr_vit.modeling_cropr_vit import masked_cross_entropy

HEADS = ("classification", "multi_label", "segmentation")


def labels_for(head: str, batch_size: int = 2, num_labels: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if head == "classification":
        return torch.randint(0, num_labels, (batch_size,), generator=generator)
    if head == "multi_label":
        return (torch.rand(batch_size, num_labels, generator=generator) > 0.5).float()
    labels = torch.randint(0, num_labels, (batch_size, 32, 32), generator=generator)
    labels[:, :4, :4] = 255  # ignored pixels
    return labels


def pixels(batch_size: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("selector", TOKEN_SELECTORS)
@pytest.mark.parametrize("last_layer_fusion", [True, False])
@pytest.mark.parametrize("use_cls_token", [True, False])
def test_shapes_losses_and_kept_counts(head, selector, last_layer_fusion, use_cls_token):
    if head == "segmentation" and not last_layer_fusion and selector != "none":
        with pytest.raises(ValueError, match="last_layer_fusion"):
            build_tiny(head, token_selector=selector, last_layer_fusion=False)
        return
    model = build_tiny(head, token_selector=selector, last_layer_fusion=last_layer_fusion, use_cls_token=use_cls_token)
    config = model.config
    labels = labels_for(head)

    model.train()
    output = model(pixels(), labels=labels)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    learned = selector in ("cropr", "non_salient")
    assert (output.aux_loss is not None) == learned
    if learned:
        assert len(output.aux_logits) == len(config.pruning_blocks)
        assert output.aux_logits[0].shape == (2, config.num_queries, config.num_labels)

    model.eval()
    with torch.no_grad():
        output = model(pixels(), output_kept_indices=True)
    assert output.aux_logits is None
    if head == "segmentation":
        assert output.logits.shape == (2, 5, 4, 4)
    else:
        assert output.logits.shape == (2, 5)
    prefix = 1 if use_cls_token else 0
    expected_kept = [
        count + prefix for block, count in enumerate(config.patch_keep_counts()) if block in config.pruning_blocks
    ]
    assert [indices.shape[1] for indices in output.kept_indices] == expected_kept


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("selector", ["cropr", "random", "variance", "attention"])
def test_every_tensor_is_made_on_the_models_device(head, selector):
    # The meta device stands in for an accelerator: a tensor made on the default device (the CPU) instead of the
    # model's would meet a meta tensor in some op and fail. Labels stay on the host, as a data loader gives them.
    overrides = {"aux_ignored_labels": [0]} if head == "segmentation" and selector == "cropr" else {}
    model = build_tiny(head, token_selector=selector, **overrides).to("meta")
    x = torch.empty(2, 3, 32, 32, device="meta")
    output = model.train()(x, labels=labels_for(head), output_kept_indices=True)
    assert output.loss.device.type == "meta" and output.kept_indices[0].device.type == "meta"
    output = model.eval()(x, output_kept_indices=True)
    assert output.logits.device.type == "meta" and output.kept_indices[-1].device.type == "meta"


@pytest.mark.parametrize("head", ["base", *HEADS])
def test_kept_indices_are_opt_in(head):
    model = build_tiny(head).eval()
    assert model(pixels()).kept_indices is None
    assert len(model(pixels(), output_kept_indices=True).kept_indices) == len(model.config.pruning_blocks)


@pytest.mark.parametrize("head", ["base", *HEADS])
def test_tuple_outputs_follow_return_dict_from_the_call_or_the_config(head):
    x = pixels()
    model = build_tiny(head).eval()
    expected = model(x, output_hidden_states=True).to_tuple()
    if head != "base":
        assert model(x).loss is None  # no labels, no loss
    as_tuple = model(x, output_hidden_states=True, return_dict=False)
    model.config.return_dict = False
    configured = model(x, output_hidden_states=True)
    for output in (as_tuple, configured):
        assert isinstance(output, tuple) and len(output) == len(expected)
        assert torch.equal(output[0], expected[0])


@pytest.mark.parametrize("head", ["base", *HEADS])
def test_attentions_and_hidden_states_follow_the_call_or_the_config(head):
    x = pixels()
    output = build_tiny(head).eval()(x)
    assert output.attentions is None and output.hidden_states is None
    model = build_tiny(head, output_attentions=True, output_hidden_states=True).eval()
    output = model(x)
    # One attention map per block over the tokens it sees, one hidden state per block plus the embeddings.
    assert [attention.shape[-1] for attention in output.attentions] == model.config.token_counts() == [17, 13, 10, 17]
    assert [hidden.shape[1] for hidden in output.hidden_states] == [17, 17, 13, 10, 17]
    assert model(x, output_attentions=False, output_hidden_states=False).attentions is None


@pytest.mark.parametrize("pooling", ["cls", "avg"])
def test_pooler_output_is_the_cls_token_or_the_mean_of_all_tokens(pooling):
    model = build_tiny("base", pooling=pooling).eval()
    output = model(pixels())
    tokens = output.last_hidden_state
    torch.testing.assert_close(output.pooler_output, tokens[:, 0] if pooling == "cls" else tokens.mean(dim=1))


@pytest.mark.parametrize("head", HEADS)
def test_task_heads_normalise_with_the_configured_epsilon(head):
    # A large epsilon, so that any other value shows in the logits.
    model = build_tiny(head, layer_norm_eps=0.5).eval()
    output = model(pixels(), output_hidden_states=True)
    tokens = model.cropr_vit.layernorm(output.hidden_states[-1])
    features = tokens[:, 1:] if head == "segmentation" else tokens.mean(dim=1)
    head_module = model.decode_head if head == "segmentation" else model.classifier
    normalised = F.layer_norm(features, (32,), head_module.norm.weight, head_module.norm.bias, eps=0.5)
    logits = head_module.linear(normalised)
    if head == "segmentation":
        logits = logits.transpose(1, 2).reshape(2, 5, 4, 4)
    torch.testing.assert_close(output.logits, logits)


def test_a_model_that_interpolates_by_default_needs_no_flag():
    model = build_tiny("classification", interpolate_pos_encoding=True).eval()
    x = pixels(size=48)
    torch.testing.assert_close(model(x).logits, model(x, interpolate_pos_encoding=True).logits)
    with pytest.raises(ValueError, match="doesn't match the model"):
        model(x, interpolate_pos_encoding=False)


def test_base_model_output_is_full_map_with_llf_and_kept_tokens_without():
    x = pixels()
    with_llf = build_tiny("base", last_layer_fusion=True).eval()(x, output_kept_indices=True)
    assert with_llf.last_hidden_state.shape == (2, 17, 32)
    assert with_llf.pooler_output.shape == (2, 32)
    without = build_tiny("base", last_layer_fusion=False).eval()(x, output_kept_indices=True)
    assert without.last_hidden_state.shape == (2, without.kept_indices[-1].shape[1], 32)
    assert without.kept_indices[-1][:, 0].eq(0).all()  # CLS stays first


def test_stop_gradient_separates_main_and_auxiliary_learning():
    model = build_tiny("classification").train()
    labels = labels_for("classification")
    router_names = {name for name, _ in model.named_parameters() if ".token_selector." in name}
    assert router_names

    model(pixels(), labels=labels).aux_loss.backward()
    for name, parameter in model.named_parameters():
        has_grad = parameter.grad is not None and parameter.grad.abs().sum() > 0
        assert has_grad == (name in router_names), name

    model.zero_grad(set_to_none=True)
    output = model(pixels(), labels=labels)
    (output.loss - model.config.aux_loss_weight * output.aux_loss).backward()
    for name, parameter in model.named_parameters():
        if name in router_names:
            assert parameter.grad is None or parameter.grad.abs().sum() == 0, name
    assert model.classifier.linear.weight.grad.abs().sum() > 0
    assert model.cropr_vit.embeddings.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("selector", ["cropr", "non_salient"])
def test_eval_keeps_the_tokens_training_selection_keeps(selector):
    model = build_tiny("classification", token_selector=selector, num_hidden_layers=6, pruning_rate=2)
    x = pixels(batch_size=4)
    model.train()
    train_kept = model(x, output_kept_indices=True).kept_indices
    model.eval()
    eval_kept = model(x, output_kept_indices=True).kept_indices
    for train_indices, eval_indices in zip(train_kept, eval_kept, strict=True):
        assert torch.equal(train_indices.sort(dim=1).values, eval_indices.sort(dim=1).values)


def identity_blocks(model: CroprViTModel) -> CroprViTModel:
    """Zero every residual branch so that each block passes its tokens through unchanged."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.o_proj.weight.zero_()
            layer.attention.o_proj.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
    return model


@pytest.mark.parametrize("selector", ["cropr", "random", "variance", "attention", "non_salient"])
def test_llf_puts_every_token_back_in_its_own_position(selector):
    # With pass-through blocks a token's output is its own embedding, so any misplaced token shows.
    model = identity_blocks(build_tiny("base", token_selector=selector)).eval()
    x = pixels()
    output = model(x, output_kept_indices=True)
    expected = model.layernorm(model.embeddings(x, interpolate_pos_encoding=False))
    assert torch.allclose(output.last_hidden_state, expected, atol=1e-6)
    assert output.kept_indices[0].shape[1] < 17  # tokens really were pruned


@pytest.mark.parametrize("head", ["base", "segmentation"])
def test_llf_hidden_states_end_with_the_full_map_in_raster_order(head):
    # The last block's recorded output is the map the final LayerNorm reads, every token in its place.
    model = build_tiny(head).eval()
    output = model(pixels(), output_hidden_states=True)
    assert [state.shape[1] for state in output.hidden_states] == [17, 17, 13, 10, 17]
    if head == "base":
        assert torch.equal(model.layernorm(output.hidden_states[-1]), output.last_hidden_state)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_llf_last_block_sees_each_set_aside_token_as_it_was_set_aside(batch_size):
    # Re-derived from the recorded block outputs: each token's latest state before the last block, in raster order.
    model = build_tiny("base").eval()
    output = model(pixels(batch_size), output_hidden_states=True, output_kept_indices=True)
    states = output.hidden_states
    token_map = states[0].clone()
    positions = torch.arange(token_map.shape[1]).expand(batch_size, -1)
    kept_positions = iter(output.kept_indices)
    for block in range(len(model.layers) - 1):
        for sample in range(batch_size):
            token_map[sample, positions[sample]] = states[block + 1][sample]
        if block in model.pruning_blocks:
            positions = next(kept_positions)
    expected = model.layernorm(model.layers[-1](token_map)[0])
    assert torch.allclose(output.last_hidden_state, expected, atol=1e-6)


def test_hidden_states_can_be_selected_by_index():
    model = build_tiny("classification").eval()
    x = pixels()
    every = model(x, output_hidden_states=True).hidden_states
    selected = model(x, output_hidden_states=[0, -1]).hidden_states
    assert len(selected) == 5 and all(state is None for state in selected[1:4])
    assert torch.equal(selected[0], every[0]) and torch.equal(selected[-1], every[-1])


def test_variance_selector_keeps_the_highest_variance_patches():
    model = build_tiny("base", token_selector="variance").eval()
    x = torch.zeros(1, 3, 32, 32)
    # A +-amplitude checkerboard per patch, amplitude growing with the raster index: variance grows with it.
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    for index in range(16):
        row, column = divmod(index, 4)
        x[0, :, row * 8 : row * 8 + 8, column * 8 : column * 8 + 8] = checkerboard * (index + 1)
    kept = model(x, output_kept_indices=True).kept_indices
    num_keep = model.config.patch_keep_counts()[0]
    expected = [0] + [16 - rank for rank in range(num_keep)]  # CLS, then patches 16, 15, ... by score
    assert kept[0][0].tolist() == expected


def test_random_selector_is_seedable_by_generator_and_global_seed():
    model = build_tiny("base", token_selector="random").eval()
    x = pixels()
    model.token_selector.generator = torch.Generator().manual_seed(3)
    first = model(x, output_kept_indices=True).kept_indices[0]
    model.token_selector.generator = torch.Generator().manual_seed(3)
    assert torch.equal(model(x, output_kept_indices=True).kept_indices[0], first)
    model.token_selector.generator = None
    torch.manual_seed(11)
    global_first = model(x, output_kept_indices=True).kept_indices[0]
    torch.manual_seed(11)
    assert torch.equal(model(x, output_kept_indices=True).kept_indices[0], global_first)


def test_selector_none_equals_plain_blocks():
    model = build_tiny("base", token_selector="none").eval()
    x = pixels()
    hidden = model.embeddings(x, interpolate_pos_encoding=False)
    for layer in model.layers:
        hidden = layer(hidden)[0]
    expected = model.layernorm(hidden)
    output = model(x, output_kept_indices=True)
    assert torch.allclose(output.last_hidden_state, expected, atol=1e-6)
    assert output.kept_indices == ()
    assert not any(".token_selector." in name for name, _ in model.named_parameters())


class OutputShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor a torch function or tensor method returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if isinstance(output, torch.Tensor):
            self.shapes.append((getattr(func, "__name__", repr(func)), tuple(output.shape)))
        return output


def test_eval_routing_of_a_many_query_module_builds_no_query_by_token_matrix():
    # Segmentation: one query per patch, 64 queries per module. Training scores the tokens with a (B, 64, M)
    # query-token matrix; eval must score them with the aggregated query alone, a (B, M) vector. (MLP width 96 and
    # batch 3, so that no other tensor has a dimension of 64 next to a token count.)
    model = build_tiny("segmentation", image_size=64, num_queries=64, intermediate_size=96).eval()
    num_queries = model.config.num_queries
    module_token_counts = {model.config.token_counts()[block] for block in model.config.pruning_blocks}
    assert num_queries not in module_token_counts  # nor an attention matrix over 64 tokens
    recorder = OutputShapeRecorder()
    with torch.no_grad(), recorder:
        model(torch.randn(3, 3, 64, 64))
    query_by_token = [
        (name, shape) for name, shape in recorder.shapes if num_queries in shape and module_token_counts & set(shape)
    ]
    assert not query_by_token
    # The only products are the scores: one vector of B * M token scores per module.
    products = [shape for name, shape in recorder.shapes if name in ("matmul", "mv")]
    assert sorted(products) == sorted((3 * count,) for count in module_token_counts)


@pytest.mark.parametrize("head", HEADS)
def test_sdpa_and_eager_attention_agree_and_attentions_are_returned(head):
    model = build_tiny(head, token_selector="cropr").eval()
    x = pixels()
    output = model(x, output_attentions=True, output_hidden_states=True, output_kept_indices=True)
    assert len(output.attentions) == 4 and len(output.hidden_states) == 5
    assert output.attentions[1].shape[-1] == output.kept_indices[0].shape[1]
    assert torch.allclose(output.logits, model(x).logits, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_tiny("classification", token_selector="random")
    labels = labels_for("classification")
    torch.manual_seed(1)
    model.train()
    model(pixels(), labels=labels).loss.backward()
    reference = model.cropr_vit.embeddings.projection.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    torch.manual_seed(1)
    model(pixels(), labels=labels).loss.backward()
    assert torch.allclose(model.cropr_vit.embeddings.projection.weight.grad, reference, atol=1e-6)


def test_aggregated_queries_are_computed_when_read_not_at_initialisation():
    model = build_tiny("classification")
    routers = list(model.cropr_vit.token_selector.routers.values())
    # Built in training mode, which scores with the queries: the buffer is the same zeros however the model is built.
    assert all(torch.equal(router.aggregated_query, torch.zeros(32)) for router in routers)
    model.eval()
    assert all(torch.allclose(router.aggregated_query, router.queries.sum(dim=0)) for router in routers)


def test_queries_are_initialised_with_std_inverse_sqrt_width():
    model = build_tiny("classification", hidden_size=64, num_attention_heads=2, num_queries=1)
    queries = torch.cat([router.queries for router in model.cropr_vit.token_selector.routers.values()])
    # Truncation bounds are absolute (+-2) as in the reference, so at this std the spread is the normal one.
    assert queries.std().item() == pytest.approx(64**-0.5, rel=0.3)
    assert queries.mean().abs().item() < 0.05


def test_curriculum_fraction_scales_pruning_and_keeps_routers_training():
    model = build_tiny("classification").train()
    model.set_pruning_fraction(0.0)
    output = model(pixels(), labels=labels_for("classification"), output_kept_indices=True)
    # Nothing removed, nothing moved: every token stays where it was.
    assert all(torch.equal(indices, torch.arange(17).expand(2, -1)) for indices in output.kept_indices)
    assert output.aux_loss is not None  # routers still learn while nothing is pruned
    model.eval()
    assert model(pixels(), output_kept_indices=True).kept_indices[0].shape[1] == 1 + model.config.patch_keep_counts()[0]
    with pytest.raises(ValueError, match="pruning fraction"):
        model.set_pruning_fraction(1.5)


@pytest.mark.parametrize("head", HEADS)
def test_save_and_load_round_trip(tmp_path, head):
    model = build_tiny(head).eval()
    x = pixels()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
        "AutoModelForSemanticSegmentation",
        "AutoBackbone",
    }
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "modeling_cropr_vit.py").exists() and (tmp_path / "routing_cropr_vit.py").exists()
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(loaded(x).logits, expected)


def test_auto_classes_resolve_every_head(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation

    build_tiny("classification").save_pretrained(tmp_path / "cls")
    build_tiny("segmentation").save_pretrained(tmp_path / "seg")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "cls"), CroprViTConfig)
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "cls")) is CroprViTForImageClassification
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "seg")) is CroprViTForSemanticSegmentation
    assert type(AutoModel.from_pretrained(tmp_path / "cls")) is CroprViTModel


@pytest.mark.parametrize("head", HEADS)
def test_stripping_removes_training_parameters_and_keeps_eval_logits(tmp_path, head):
    model = build_tiny(head).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-1)
    for _ in range(3):  # move the queries far from their init, so that a stale aggregated query changes the routing
        model(pixels(), labels=labels_for(head)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    x = pixels(seed=5)
    reference = copy.deepcopy(model).eval()
    expected = reference(x, output_kept_indices=True)
    model.save_pretrained(tmp_path / "full")
    # Stripped straight after training, still in train mode (as the training scripts do after `Trainer.train`): the
    # aggregated query must come from the trained queries, not from the last switch to eval mode.
    model.strip_training_modules()
    assert model.training
    assert not any(key in name for name, _ in model.named_parameters() for key in ("queries", "aggregator", "aux_head"))
    model.save_pretrained(tmp_path / "stripped")
    full_size = (tmp_path / "full" / "model.safetensors").stat().st_size
    stripped_size = (tmp_path / "stripped" / "model.safetensors").stat().st_size
    assert stripped_size < full_size

    loaded = type(model).from_pretrained(tmp_path / "stripped")
    assert loaded.config.inference_only
    for stripped in (model.eval(), loaded):
        output = stripped(x, output_kept_indices=True)
        assert torch.equal(output.logits, expected.logits)
        for stripped_indices, expected_indices in zip(output.kept_indices, expected.kept_indices, strict=True):
            assert torch.equal(stripped_indices, expected_indices)


def test_trust_remote_code_loads_without_the_package(tmp_path):
    model = build_tiny("multi_label").eval()
    x = pixels()
    model.save_pretrained(tmp_path / "checkpoint")
    torch.save({"pixels": x, "logits": model(x).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class BlockCropr(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "cropr" or name.startswith("cropr."):
                    raise ImportError("cropr is blocked in this process")

        sys.meta_path.insert(0, BlockCropr())
        try:
            import cropr  # noqa: F401
            raise SystemExit("cropr should not be importable here")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForImageClassification

        checkpoint = {str(tmp_path / "checkpoint")!r}
        model = AutoModelForImageClassification.from_pretrained(checkpoint, trust_remote_code=True)
        assert type(model).__name__ == "CroprViTForMultiLabelClassification", type(model)
        assert "cropr" not in sys.modules
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        logits = model.eval()(expected["pixels"]).logits
        assert torch.allclose(logits, expected["logits"], atol=1e-6), (logits - expected["logits"]).abs().max()
        print("remote code ok")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code ok" in result.stdout
    assert REPO_ROOT.exists()


def upsampled_logits(logits: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Patch-resolution segmentation logits bilinearly resized to the label size, as the main loss compares them."""
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def patch_labels_of(labels: torch.Tensor, patch_size: int = 8) -> torch.Tensor:
    """(B, H, W) pixel labels -> (B, num_patches) raster labels: each patch's top-left pixel (nearest downsampling)."""
    return labels[:, ::patch_size, ::patch_size].flatten(1)


def expected_losses(head: str, output, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Main and summed auxiliary losses recomputed from the output's logits with plain torch losses."""
    if head == "classification":
        main = F.cross_entropy(output.logits, labels)
        aux = [F.cross_entropy(logits[:, 0], labels) for logits in output.aux_logits]  # one query per module
    elif head == "multi_label":
        main = F.binary_cross_entropy_with_logits(output.logits, labels)
        aux = [F.binary_cross_entropy_with_logits(logits[:, 0], labels) for logits in output.aux_logits]
    else:
        # F.cross_entropy averages over the labels that are not ignored.
        main = F.cross_entropy(upsampled_logits(output.logits), labels, ignore_index=255)
        patch_labels = patch_labels_of(labels).flatten()
        aux = [F.cross_entropy(logits.flatten(0, 1), patch_labels, ignore_index=255) for logits in output.aux_logits]
    return main, torch.stack(aux).sum()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("weight", [0.25, 0.0])
def test_loss_is_the_main_loss_plus_the_weighted_sum_of_the_auxiliary_losses(head, weight):
    model = build_tiny(head, aux_loss_weight=weight).train()
    labels = labels_for(head)
    output = model(pixels(), labels=labels)
    main, aux = expected_losses(head, output, labels)
    assert len(output.aux_logits) == 2 and aux > 0
    torch.testing.assert_close(output.aux_loss, aux)
    torch.testing.assert_close(output.loss, main + weight * aux)


@pytest.mark.parametrize(
    "labels", [[0, 1, 255, 3, 4, 255, 255, 2, 1, 0, 255, 4], [255] * 11 + [3]], ids=["some-ignored", "one-labelled"]
)
def test_masked_cross_entropy_averages_over_the_labels_that_are_not_ignored(labels):
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor(labels)
    kept = labels != 255
    expected = -torch.log_softmax(logits[kept], dim=-1).gather(1, labels[kept, None]).mean()
    torch.testing.assert_close(masked_cross_entropy(logits, labels, ignore_index=255), expected)


@pytest.mark.parametrize(
    ("num_labels", "labels"),
    [(1, torch.tensor([2, -1])), (1, torch.tensor([0.5, 1.5])), (3, torch.tensor([[0.5, 1.0, -2.0], [0.0, 3.0, 1.0]]))],
    ids=["one-output-integer-targets", "one-output", "three-outputs"],
)
def test_regression_loss_is_the_mean_squared_error_of_every_head(num_labels, labels):
    # One output is read as regression by default; several need it set (float labels would be multi-label).
    problem_type = None if num_labels == 1 else "regression"
    model = build_tiny("classification", num_labels=num_labels, problem_type=problem_type, aux_loss_weight=0.5).train()
    output = model(pixels(), labels=labels)
    assert model.config.problem_type == "regression"
    targets = labels.float().reshape(2, num_labels)
    aux = sum(((logits[:, 0] - targets) ** 2).mean() for logits in output.aux_logits)
    torch.testing.assert_close(output.aux_loss, aux)
    torch.testing.assert_close(output.loss, ((output.logits - targets) ** 2).mean() + 0.5 * aux)


def test_multi_hot_labels_may_be_integers():
    model = build_tiny("multi_label").train()
    labels = labels_for("multi_label")
    torch.testing.assert_close(model(pixels(), labels=labels.long()).loss, model(pixels(), labels=labels).loss)


def test_segmentation_logits_are_the_decode_head_of_each_patch_token_in_raster_order():
    model = build_tiny("segmentation").eval()
    output = model(pixels(), output_hidden_states=True)
    patch_tokens = model.cropr_vit.layernorm(output.hidden_states[-1])[:, 1:]
    per_patch = model.decode_head(patch_tokens)  # (B, 16, C), patch p at row p // 4, column p % 4
    for patch in (0, 1, 6, 15):
        torch.testing.assert_close(output.logits[:, :, patch // 4, patch % 4], per_patch[:, patch])


def test_segmentation_losses_respect_the_ignore_index():
    model = build_tiny("segmentation").train()
    x = pixels()
    labels = torch.full((2, 32, 32), 255)
    labels[:, 16:, 16:] = 1  # one labelled quarter: patches (2..3, 2..3) of the 4x4 grid
    output = model(x, labels=labels)
    assert torch.isfinite(output.loss)
    # The main loss is the mean over the labelled quarter only: ignored pixels neither add nor count.
    main = F.cross_entropy(upsampled_logits(output.logits)[:, :, 16:, 16:], labels[:, 16:, 16:])
    torch.testing.assert_close(output.loss - output.aux_loss, main)
    # Likewise each module's auxiliary loss: the mean over the 4 labelled patches of each image.
    labelled_patches = [10, 11, 14, 15]
    aux = sum(
        F.cross_entropy(logits[:, labelled_patches].flatten(0, 1), torch.ones(8, dtype=torch.long))
        for logits in output.aux_logits
    )
    torch.testing.assert_close(output.aux_loss, aux)
    # Labelling the rest of the image (class 2) changes the loss: the quarter alone was what counted before.
    relabelled = labels.masked_fill(labels == 255, 2)
    assert not torch.allclose(model(x, labels=relabelled).loss, output.loss)


def test_segmentation_loss_of_an_all_ignored_batch_is_zero_not_nan():
    model = build_tiny("segmentation").train()
    output = model(pixels(), labels=torch.full((2, 32, 32), 255))
    assert output.loss.item() == 0.0 and output.aux_loss.item() == 0.0
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_aux_ignored_labels_are_ignored_by_the_auxiliary_loss_only():
    torch.manual_seed(0)
    ignoring = build_tiny("segmentation", aux_ignored_labels=[0, 3]).train()
    plain = build_tiny("segmentation").train()
    plain.load_state_dict(ignoring.state_dict())
    x, labels = pixels(), labels_for("segmentation")
    relabelled = labels.masked_fill((labels == 0) | (labels == 3), 255)
    with torch.no_grad():
        ignoring_output = ignoring(x, labels=labels)
        assert torch.allclose(ignoring_output.aux_loss, plain(x, labels=relabelled).aux_loss)
        plain_output = plain(x, labels=labels)
    # The main loss still learns classes 0 and 3; only the auxiliary loss changed.
    assert torch.allclose(ignoring_output.loss - ignoring_output.aux_loss, plain_output.loss - plain_output.aux_loss)
    assert not torch.allclose(ignoring_output.aux_loss, plain_output.aux_loss)
    # A batch of ignored classes only trains nothing in the Cropr modules, and stays finite.
    only_ignored = ignoring(x, labels=torch.zeros(2, 32, 32, dtype=torch.long))
    assert only_ignored.aux_loss.item() == 0.0 and torch.isfinite(only_ignored.loss)


def test_aux_ignored_labels_are_refused_by_image_level_heads():
    with pytest.raises(ValueError, match="semantic segmentation only"):
        build_tiny("classification", aux_ignored_labels=[0])


def test_segmentation_rejects_wrong_number_of_queries():
    with pytest.raises(ValueError, match="num_queries=16"):
        CroprViTForSemanticSegmentation(CroprViTConfig(**tiny_config_kwargs(num_queries=3)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("token_selector", "none"),
        ("last_layer_fusion", False),
        ("pruning_rate", 2),
        ("pruning_rate", 100),
        ("pruning_schedule", [1, 0, 0, 0]),
        ("num_queries", 2),
        ("hidden_size", 64),
        ("num_labels", 3),
        ("pooling", "cls"),
        ("drop_path_rate", 0.1),
        ("inference_only", True),
    ],
)
def test_structural_config_fields_cannot_change_on_a_built_model(tmp_path, field, value):
    """Before: forward ran on the old modules, and the saved config no longer matched the saved weights."""
    model = build_tiny("classification").eval()
    setattr(model.config, field, value)
    message = rf"`config\.{field}` was changed from .* after this CroprViTForImageClassification was built"
    with pytest.raises(ValueError, match=message):
        model(pixels())
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


def test_structural_change_error_points_at_the_supported_way():
    model = build_tiny("base").eval()
    model.config.token_selector = "random"
    with pytest.raises(ValueError, match=r"with_token_selector"):
        model(pixels())
    model.config.token_selector = "cropr"  # set back: the model works again
    model.config.pruning_schedule = [2, 0, 0, 0]
    hint = r"set_pruning_schedule\(\.\.\.\).*from_pretrained\(path, pruning_schedule=\.\.\.\)"
    with pytest.raises(ValueError, match=hint):
        model(pixels())
    model.config.pruning_schedule = None
    assert model(pixels()).last_hidden_state.shape == (2, 17, 32)


@pytest.mark.parametrize(
    ("head", "field", "value", "message"),
    [
        ("classification", "aux_loss_weight", -1.0, "`aux_loss_weight` must be >= 0"),
        ("classification", "aux_ignored_labels", [0], "semantic segmentation only"),
        ("segmentation", "aux_ignored_labels", [7], r"`aux_ignored_labels` must be class ids in \[0, 4\]"),
    ],
)
def test_invalid_values_set_on_a_built_model_fail_at_forward_and_save_writes_nothing(
    tmp_path, head, field, value, message
):
    """Before: forward ran with the invalid value; saving failed after the code files were written."""
    model = build_tiny(head).train()
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=message):
        model(pixels(), labels=labels_for(head))
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(existing)
    assert list(existing.iterdir()) == []


def test_runtime_fields_may_change_on_a_built_model(tmp_path):
    model = build_tiny("classification").train()
    labels = labels_for("classification")
    torch.manual_seed(0)
    full = model(pixels(), labels=labels)
    model.config.aux_loss_weight = 0.0
    torch.manual_seed(0)
    main_only = model(pixels(), labels=labels)
    assert torch.allclose(main_only.loss, full.loss - full.aux_loss)
    model.config.interpolate_pos_encoding = True
    assert model.eval()(pixels(size=48)).logits.shape == (2, 5)
    model.save_pretrained(tmp_path)
    reloaded = CroprViTForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.aux_loss_weight == 0.0 and reloaded.config.interpolate_pos_encoding


def test_supported_structure_changes_keep_working(tmp_path):
    model = build_tiny("classification").eval()
    x = pixels()
    unpruned = model.with_token_selector("none")
    assert unpruned.config.token_selector == "none" and unpruned(x).logits.shape == (2, 5)
    model.train().set_pruning_fraction(0.5)
    model(x, labels=labels_for("classification"))
    model.eval().strip_training_modules()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = CroprViTForImageClassification.from_pretrained(tmp_path, pruning_rate=2)
    assert reloaded.config.pruning_rate == 2 and reloaded(x).logits.shape == (2, 5)
    assert torch.equal(CroprViTForImageClassification.from_pretrained(tmp_path)(x).logits, expected)


def test_a_save_that_fails_midway_removes_the_folder_it_created(tmp_path, monkeypatch):
    model = build_tiny("classification")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(CroprViTConfig, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "kept")
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("first", ["base", "classification", "multi_label", "segmentation"])
def test_constructors_leave_the_callers_config_unchanged(first):
    """Before: the multi-label head set `problem_type` on the caller's config, and a classifier built from the same
    config afterwards read class-id labels as multi-hot."""
    from conftest import head_classes

    config = CroprViTConfig(**tiny_config_kwargs(num_queries=16 if first == "segmentation" else 1))
    before = copy.deepcopy(config.to_dict())
    model = head_classes()[first](config)
    assert config.to_dict() == before
    if first == "multi_label":
        assert model.config.problem_type == "multi_label_classification"
        classifier = CroprViTForImageClassification(config)
        assert config.to_dict() == before
        assert torch.isfinite(classifier(pixels(), labels=torch.tensor([0, 4])).loss)
