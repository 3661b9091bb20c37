"""The contrast read-out: a ridge regression, per Cropr module, of each image's patch ranks by pixel variance."""

import pytest
import torch

from cropr.contrast_readout import ContrastReadout, mixed_query
from cropr.models.cropr_vit.routing_cropr_vit import patch_pixel_variance

PATCH = (8, 8)
HIDDEN = 6


def batch(seed: int, num_images: int = 8):
    """Pixels whose 16 patches vary by a drawn amount each, and block outputs (CLS first) whose first feature is the
    image's centred patch rank by that variance, the others noise: the signal the read-out must find."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(num_images, 1, 4, 1, 4, 1, generator=generator) * 3
    pixel_values = (torch.randn(num_images, 3, 4, 8, 4, 8, generator=generator) * scale).reshape(num_images, 3, 32, 32)
    ranks = patch_pixel_variance(pixel_values, PATCH).argsort(dim=1).argsort(dim=1).float() / 16
    patches = torch.randn(num_images, 16, HIDDEN, generator=generator)
    patches[..., 0] = 3 * (ranks - ranks.mean(dim=1, keepdim=True)) + 0.05 * patches[..., 0] + 7.0
    tokens = torch.cat([torch.randn(num_images, 1, HIDDEN, generator=generator), patches], dim=1)
    return (torch.randn_like(tokens), tokens), pixel_values, ranks


def test_it_finds_the_feature_that_ranks_patches_by_contrast():
    readout = ContrastReadout(["0"], HIDDEN, num_prefix_tokens=1, patch_size=PATCH)
    for seed in range(4):
        hidden_states, pixel_values, _ = batch(seed)
        readout.accumulate(hidden_states, pixel_values)
    query = readout.queries()["0"]
    assert torch.nn.functional.cosine_similarity(query, torch.eye(HIDDEN, dtype=query.dtype)[0], dim=0) > 0.99
    hidden_states, pixel_values, ranks = batch(seed=9)  # unseen images: the scores order the patches as variance does
    scores = hidden_states[1][:, 1:].double() @ query
    assert torch.equal(scores.argsort(dim=1), ranks.argsort(dim=1))


def test_the_score_spread_is_the_deviation_of_scores_around_each_image_mean():
    readout = ContrastReadout(["0"], HIDDEN, num_prefix_tokens=1, patch_size=PATCH)
    hidden_states, pixel_values, _ = batch(seed=0)
    readout.accumulate(hidden_states, pixel_values)
    query = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    scores = hidden_states[1][:, 1:] @ query
    expected = (scores - scores.mean(dim=1, keepdim=True)).pow(2).mean().sqrt()
    assert readout.score_spread("0", query) == pytest.approx(float(expected), rel=1e-5)


def test_its_sums_survive_a_save_and_load():
    readout, restored = (ContrastReadout(["2", "5"], HIDDEN, 1, PATCH) for _ in range(2))
    hidden_states, pixel_values, _ = batch(seed=0)
    embeddings, block_output = hidden_states
    readout.accumulate((embeddings, *[block_output] * 6), pixel_values)  # the outputs of blocks 0 to 5
    restored.load_state_tensors({key: value.clone() for key, value in readout.state_tensors().items()})
    for block, query in readout.queries().items():
        assert torch.equal(restored.queries()[block], query)
    assert restored.score_spread("5", torch.ones(HIDDEN)) == readout.score_spread("5", torch.ones(HIDDEN))


def test_a_mix_weighs_each_scorer_on_a_common_scale():
    learned, contrast = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 10.0])
    torch.testing.assert_close(mixed_query(learned, contrast, 0.5, (2.0, 10.0)), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(mixed_query(learned, contrast, 1.0, (2.0, 10.0)), torch.tensor([0.0, 1.0]))
    assert mixed_query(learned, contrast, 0.0, (2.0, 10.0)).equal(learned)  # the learned query as it was
    # a scorer without spread (nothing learned, no contrast in the images) adds nothing
    torch.testing.assert_close(mixed_query(learned, contrast, 0.5, (2.0, 0.0)), torch.tensor([0.5, 0.0]))
    assert mixed_query(learned.half(), contrast, 0.5, (2.0, 10.0)).dtype == torch.float16
