"""Properties over random valid configs (hypothesis) and batch independence.

Configs vary depth, width, heads, patch and image size (non-square grids included), CLS on/off, Last Layer Fusion
on/off, the selector, and the schedule (a per-block rate or an explicit per-block schedule, always one that fits).
Examples are derandomized so the suite is reproducible; `max_examples` stays small to keep it fast.
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import head_classes, tiny_config_kwargs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cropr import (
    CroprViTConfig,
    CroprViTModel,
)
from cropr.models.cropr_vit.configuration_cropr_vit import LEARNED_SELECTORS, TOKEN_SELECTORS

HEAD_CLASSES = head_classes()
PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Case:
    head: str
    config: CroprViTConfig

    def model(self, seed: int = 0):
        torch.manual_seed(seed)
        return HEAD_CLASSES[self.head](copy.deepcopy(self.config))

    def pixels(self, batch_size: int = 2, seed: int = 1) -> torch.Tensor:
        height, width = self.config.image_size_hw
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, self.config.num_channels, height, width, generator=generator)

    def labels(self, batch_size: int = 2) -> torch.Tensor | None:
        generator = torch.Generator().manual_seed(2)
        num_labels = self.config.num_labels
        if self.head == "classification":
            return torch.randint(0, num_labels, (batch_size,), generator=generator)
        if self.head == "multi_label":
            return torch.randint(0, 2, (batch_size, num_labels), generator=generator).float()
        if self.head == "segmentation":
            return torch.randint(0, num_labels, (batch_size, *self.config.image_size_hw), generator=generator)
        return None


@st.composite
def cases(draw, heads=tuple(HEAD_CLASSES), selectors=TOKEN_SELECTORS) -> Case:
    head = draw(st.sampled_from(heads))
    depth = draw(st.integers(1, 6))
    num_heads = draw(st.integers(1, 3))
    hidden_size = num_heads * draw(st.sampled_from([4, 8]))
    patch_h, patch_w = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    grid_h, grid_w = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    use_cls_token = draw(st.booleans())
    llf = True if head == "segmentation" else draw(st.booleans())
    selector = draw(st.sampled_from(selectors))
    num_patches = grid_h * grid_w
    num_modules = max(depth - (2 if llf else 1), 0)
    budget = num_patches - 1  # at least one patch token must remain
    schedule_kwargs: dict = {}
    if draw(st.booleans()):
        max_rate = max((budget - int(use_cls_token)) // num_modules, 0) if num_modules else 0
        schedule_kwargs["pruning_rate"] = draw(st.integers(min(1, max_rate), max_rate))  # 0 only when it must
    else:
        schedule = [0] * depth
        for block in range(num_modules):
            left = budget - sum(schedule)
            schedule[block] = draw(st.just(0) | st.integers(min(1, left), left))
        schedule_kwargs["pruning_schedule"] = schedule
    config = CroprViTConfig(
        image_size=[grid_h * patch_h, grid_w * patch_w],
        patch_size=[patch_h, patch_w],
        hidden_size=hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        use_cls_token=use_cls_token,
        last_layer_fusion=llf,
        token_selector=selector,
        num_queries=num_patches if head == "segmentation" else 1,
        pooling=draw(st.sampled_from(["avg", "cls"])) if use_cls_token else "avg",
        num_labels=draw(st.integers(2, 4)),
        **schedule_kwargs,
    )
    return Case(head, config)


def expected_kept(config: CroprViTConfig, fraction: float = 1.0) -> list[int]:
    """Tokens (prefix included) each pruning module keeps at `image_size` and curriculum `fraction`."""
    keep = config.patch_keep_counts(fraction=fraction)
    return [keep[block] + config.num_prefix_tokens for block in config.pruning_blocks]


def identity_blocks(backbone: CroprViTModel) -> CroprViTModel:
    """Zero every block's residual branch: each block then passes its tokens through unchanged."""
    with torch.no_grad():
        for layer in backbone.layers:
            for linear in (layer.attention.o_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return backbone


@PROPERTY_SETTINGS
@given(cases(), st.sampled_from([1.0, 0.0, 0.4]))
def test_forward_backward_run_every_parameter_learns_and_kept_counts_follow_the_schedule(case, fraction):
    """Also part-way through the R curriculum (`fraction` < 1): the routers still learn while pruning less."""
    model = case.model().train()
    model.set_pruning_fraction(fraction)
    x, labels = case.pixels(), case.labels()
    output = (
        model(x, labels=labels, output_kept_indices=True) if labels is not None else model(x, output_kept_indices=True)
    )
    assert [indices.shape[1] for indices in output.kept_indices] == expected_kept(case.config, fraction)
    if labels is None:
        output.last_hidden_state.sum().backward()
        return
    assert torch.isfinite(output.loss)
    output.loss.backward()
    # Every parameter gets a gradient at every step (DDP runs without `find_unused_parameters`).
    unused = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not unused, unused

    model.eval()
    with torch.no_grad():
        output = model(x, output_kept_indices=True)
    assert [indices.shape[1] for indices in output.kept_indices] == expected_kept(case.config)
    for indices in output.kept_indices:  # each kept position is a real, distinct token; CLS first when present
        assert all(row.unique().numel() == row.numel() for row in indices)
        if case.config.use_cls_token:
            assert indices[:, 0].eq(0).all()
    height, width = case.config.image_size_hw
    patch_h, patch_w = case.config.patch_size_hw
    if case.head == "segmentation":
        assert output.logits.shape == (2, case.config.num_labels, height // patch_h, width // patch_w)
    else:
        assert output.logits.shape == (2, case.config.num_labels)


@PROPERTY_SETTINGS
@given(cases(heads=("base",)))
def test_output_tokens_sit_at_their_original_positions(case):
    """With pass-through blocks each output token is its own embedding: LLF output equals the input map position by
    position (raster order); without LLF the output is the embeddings at the last module's kept positions."""
    model = identity_blocks(case.model()).eval()
    x = case.pixels()
    with torch.no_grad():
        output = model(x, output_kept_indices=True)
        embedded = model.layernorm(model.embeddings(x, interpolate_pos_encoding=False))
    if case.config.last_layer_fusion or not case.config.pruning_blocks:
        expected = embedded
    else:
        positions = output.kept_indices[-1]
        expected = embedded.gather(1, positions.unsqueeze(-1).expand(-1, -1, embedded.shape[-1]))
    assert output.last_hidden_state.shape == expected.shape
    assert torch.allclose(output.last_hidden_state, expected, atol=1e-5)


@pytest.mark.parametrize("selector", [selector for selector in TOKEN_SELECTORS if selector != "none"])
@pytest.mark.parametrize(("height", "width"), [(48, 40), (16, 24)])
def test_raster_order_holds_at_other_resolutions(selector, height, width):
    config = CroprViTConfig(**tiny_config_kwargs(hidden_size=16, pruning_rate=5, token_selector=selector))
    model = identity_blocks(Case("base", config).model()).eval()
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(x, interpolate_pos_encoding=True, output_kept_indices=True)
        expected = model.layernorm(model.embeddings(x, interpolate_pos_encoding=True))
    num_patches = (height // 8) * (width // 8)
    assert [kept.shape[1] - 1 for kept in output.kept_indices] == [
        config.patch_keep_counts(num_patches)[block] for block in config.pruning_blocks
    ]
    assert torch.allclose(output.last_hidden_state, expected, atol=1e-5)


@PROPERTY_SETTINGS
@given(cases(heads=("classification", "multi_label", "segmentation"), selectors=LEARNED_SELECTORS))
def test_stripping_the_training_modules_keeps_eval_logits(case):
    model = case.model().train()
    # One step so the queries move away from their initialisation (a stale aggregated query would show).
    model(case.pixels(), labels=case.labels()).loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= 0.5 * parameter.grad
    model.eval()
    x = case.pixels(seed=7)
    with torch.no_grad():
        expected = model(x, output_kept_indices=True)
        stripped = copy.deepcopy(model).strip_training_modules()
        output = stripped(x, output_kept_indices=True)
    assert not any("queries" in name for name, _ in stripped.named_parameters())
    assert torch.equal(output.logits, expected.logits)
    for kept, expected_kept_ in zip(output.kept_indices, expected.kept_indices, strict=True):
        assert torch.equal(kept, expected_kept_)


# ----------------------------------------------------------------------------------------------------------------------
# Batch independence: a sample's outputs do not depend on the other samples of its batch
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selector", [selector for selector in TOKEN_SELECTORS if selector != "random"])
@pytest.mark.parametrize("head", ["classification", "multi_label", "segmentation"])
def test_a_samples_logits_do_not_depend_on_the_rest_of_the_batch(head, selector):
    config = CroprViTConfig(
        **tiny_config_kwargs(token_selector=selector, num_queries=16 if head == "segmentation" else 1)
    )
    model = Case(head, config).model().eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x[3] = 0.0  # a constant image (tied variance scores) among ordinary ones
    with torch.no_grad():
        batched = model(x, output_kept_indices=True)
        permutation = torch.tensor([4, 2, 0, 3, 1])
        permuted = model(x[permutation], output_kept_indices=True)
        for index in range(x.shape[0]):
            alone = model(x[index : index + 1], output_kept_indices=True)
            assert torch.allclose(alone.logits[0], batched.logits[index], atol=1e-5), index
            for kept_alone, kept_batched in zip(alone.kept_indices, batched.kept_indices, strict=True):
                assert torch.equal(kept_alone[0], kept_batched[index])
    assert torch.allclose(permuted.logits, batched.logits[permutation], atol=1e-5)
