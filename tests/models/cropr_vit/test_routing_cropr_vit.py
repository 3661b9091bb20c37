import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config_kwargs

from cropr import CroprViTConfig
from cropr.models.cropr_vit.routing_cropr_vit import (
    CroprAggregator,
    CroprRouter,
    RoutingState,
    TokenSelector,
    gather_tokens,
    patch_pixel_variance,
    rank_tokens,
    received_attention,
)


def test_rank_tokens_keeps_prefix_first_then_patches_by_score_and_sets_the_rest_aside():
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0, 3.0], [7.0, 0.0, 2.0, 1.0, 4.0]])
    prefix_index = torch.zeros(2, 1, dtype=torch.long)
    keep, set_aside = rank_tokens(scores, 2, prefix_index)
    assert keep.tolist() == [[0, 3, 1], [0, 4, 2]]
    assert [sorted(row) for row in set_aside.tolist()] == [[2, 4], [1, 3]]
    keep, set_aside = rank_tokens(scores, 2, None)
    assert keep.tolist() == [[3, 1], [0, 4]]
    assert [sorted(row) for row in set_aside.tolist()] == [[0, 2, 4], [1, 2, 3]]


def test_rank_tokens_never_puts_a_tied_token_in_both_sets():
    # Flat background patches all score 0 under the variance selector.
    keep, set_aside = rank_tokens(torch.zeros(3, 17), 5, torch.zeros(3, 1, dtype=torch.long))
    for kept_row, set_aside_row in zip(keep.tolist(), set_aside.tolist(), strict=True):
        assert sorted(kept_row + set_aside_row) == list(range(17))


def test_gather_tokens_copies_the_indexed_rows_at_every_batch_size():
    for batch_size in (1, 3):
        tokens = torch.randn(batch_size, 6, 4)
        index = torch.stack([torch.randperm(6)[:4] for _ in range(batch_size)])
        expected = torch.stack([tokens[sample, index[sample]] for sample in range(batch_size)])
        assert torch.equal(gather_tokens(tokens, index), expected)


def test_token_map_holds_each_set_aside_token_as_it_was_set_aside_and_kept_ones_as_they_end():
    batch_size, num_tokens, width = 2, 7, 3
    state = RoutingState(
        num_tokens=num_tokens,
        keep_counts=[],
        prefix_index=torch.zeros(batch_size, 1, dtype=torch.long),
        positions=torch.arange(num_tokens).expand(batch_size, -1),
        last_layer_fusion=True,
    )
    first = torch.randn(batch_size, num_tokens, width)
    first_keep = torch.tensor([[0, 5, 2, 3], [0, 1, 6, 4]])
    first_set_aside = torch.tensor([[1, 4, 6], [2, 3, 5]])
    kept = state.keep(first, first_keep, first_set_aside)
    assert torch.equal(kept, gather_tokens(first, first_keep))
    second = torch.randn(batch_size, 4, width)  # the next block's output for the kept tokens
    second_keep = torch.tensor([[0, 2], [0, 3]])  # raster positions 2 and 4
    second_set_aside = torch.tensor([[1, 3], [1, 2]])
    final = torch.randn(batch_size, 2, width)
    state.keep(second, second_keep, second_set_aside)
    fused = state.fuse_tokens(final)
    expected = torch.empty_like(first)
    for sample in range(batch_size):
        expected[sample, first_set_aside[sample]] = first[sample, first_set_aside[sample]]
        expected[sample, first_keep[sample, second_set_aside[sample]]] = second[sample, second_set_aside[sample]]
        expected[sample, first_keep[sample, second_keep[sample]]] = final[sample]
    assert torch.equal(fused, expected)
    assert state.positions.tolist() == [[0, 2], [0, 4]]


def test_rotary_angles_follow_the_kept_tokens_and_return_to_raster_order_at_fusion():
    batch_size, num_tokens, head_dim = 2, 5, 4
    table = (torch.randn(num_tokens, head_dim), torch.randn(num_tokens, head_dim))
    state = RoutingState(
        num_tokens=num_tokens,
        keep_counts=[],
        prefix_index=None,
        positions=torch.arange(num_tokens).expand(batch_size, -1),
        last_layer_fusion=True,
        rotary_table=table,
    )
    assert all(torch.equal(current[0], full) for current, full in zip(state.rotary, table, strict=True))
    keep, set_aside = torch.tensor([[4, 1], [0, 3]]), torch.tensor([[0, 2, 3], [1, 2, 4]])
    state.keep(torch.randn(batch_size, num_tokens, 3), keep, set_aside)
    for current, full in zip(state.rotary, table, strict=True):
        assert torch.equal(current, torch.stack([full[keep[sample]] for sample in range(batch_size)]))
    state.fuse_tokens(torch.randn(batch_size, 2, 3))
    assert all(torch.equal(current[0], full) for current, full in zip(state.rotary, table, strict=True))


def test_patch_pixel_variance_matches_a_direct_computation():
    pixels = torch.randn(2, 3, 16, 24)
    variance = patch_pixel_variance(pixels, (8, 8))
    assert variance.shape == (2, 6)
    patch = pixels[1, :, 8:16, 16:24]  # row 1, column 2 -> raster index 5
    assert torch.allclose(variance[1, 5], patch.reshape(3, -1).var(dim=1).mean())


def test_received_attention_from_all_queries_or_cls():
    probs = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    assert torch.allclose(received_attention(probs, from_cls_only=False), probs.mean(dim=(1, 2)))
    assert torch.allclose(received_attention(probs, from_cls_only=True), probs[:, :, 0].mean(dim=1))


def summed_query_scores(queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each token's score as defined: the sum over queries of the query-token dot products, one dot at a time."""
    return torch.tensor(
        [[sum(torch.dot(query, token).item() for query in queries) for token in sample] for sample in tokens]
    )


def test_eval_scores_from_aggregated_query_equal_the_sum_over_queries():
    config = CroprViTConfig(**tiny_config_kwargs(num_queries=7))
    router = CroprRouter(config)
    torch.nn.init.trunc_normal_(router.queries, std=config.hidden_size**-0.5)
    tokens = torch.randn(3, 11, config.hidden_size)
    router.train()
    train_scores, aux_logits = router(tokens)
    assert aux_logits.shape == (3, 7, config.num_labels)
    router.eval()
    eval_scores, no_aux = router(tokens)
    assert no_aux is None
    expected = summed_query_scores(router.queries.detach(), tokens)
    assert torch.allclose(eval_scores, expected, atol=1e-5)
    assert torch.allclose(train_scores, expected, atol=1e-5)


def test_aggregated_query_follows_weight_updates_and_loading():
    config = CroprViTConfig(**tiny_config_kwargs())
    router = CroprRouter(config)
    with torch.no_grad():
        router.queries.normal_()
    router.eval()
    assert torch.allclose(router.aggregated_query, router.queries.sum(0))
    state = {name: torch.randn_like(value) for name, value in router.state_dict().items()}
    router.load_state_dict(state)
    assert torch.allclose(router.aggregated_query, state["queries"].sum(0))


def test_non_salient_router_inverts_the_scores():
    cropr = CroprRouter(CroprViTConfig(**tiny_config_kwargs()))
    non_salient = CroprRouter(CroprViTConfig(**tiny_config_kwargs(token_selector="non_salient")))
    torch.nn.init.normal_(cropr.queries)
    non_salient.load_state_dict(cropr.state_dict())
    tokens = torch.randn(2, 5, cropr.queries.shape[1])
    for mode in (True, False):
        scores = summed_query_scores(cropr.queries.detach(), tokens)
        assert torch.allclose(cropr.train(mode)(tokens)[0], scores, atol=1e-5)
        assert torch.allclose(non_salient.train(mode)(tokens)[0], -scores, atol=1e-5)


@pytest.mark.parametrize("mlp", [True, False])
def test_aggregator_pools_tokens_by_softmax_of_logits_over_sqrt_width(mlp):
    config = CroprViTConfig(**tiny_config_kwargs(aggregator_mlp=mlp))
    aggregator = CroprAggregator(config)
    for parameter in aggregator.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    logits, tokens = torch.randn(2, 3, 5) * 4, torch.randn(2, 5, config.hidden_size)
    weights = torch.exp(logits / config.hidden_size**0.5)
    pooled = (weights / weights.sum(dim=-1, keepdim=True)) @ tokens
    if mlp:
        hidden = F.layer_norm(pooled, (config.hidden_size,), aggregator.norm.weight, aggregator.norm.bias, eps=1e-6)
        pooled = pooled + aggregator.fc2(F.gelu(aggregator.fc1(hidden)))
    torch.testing.assert_close(aggregator(logits, tokens), pooled)


def test_router_layer_norms_use_the_reference_epsilons():
    # Checkpoints of the reference implementation were trained with these: 1e-6 in the aggregator, 1e-5 in the head.
    router = CroprRouter(CroprViTConfig(**tiny_config_kwargs()))
    assert router.aggregator.norm.eps == 1e-6 and router.aux_head.norm.eps == 1e-5


def test_an_inference_only_router_has_no_training_modules_and_scores_any_dtype():
    router = CroprRouter(CroprViTConfig(**tiny_config_kwargs(inference_only=True))).eval()
    assert router.queries is None and router.aggregator is None and router.aux_head is None
    torch.nn.init.normal_(router.aggregated_query)
    tokens = torch.randn(2, 5, router.aggregated_query.shape[0])
    scores, aux_logits = router.train()(tokens)  # stays frozen in training: no queries to score with
    assert aux_logits is None
    torch.testing.assert_close(scores, tokens @ router.aggregated_query)
    # Tokens of a lower precision than the float32 query (a model cast to bf16) are scored in their own dtype.
    assert router(tokens.bfloat16())[0].dtype == torch.bfloat16
    # Under autocast the residual stream stays float32, and so do its scores: no rounding to 8-bit mantissas.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_scores = router(tokens)[0]
    assert autocast_scores.dtype == torch.float32
    torch.testing.assert_close(autocast_scores, tokens @ router.aggregated_query)


@pytest.mark.parametrize("pooling", ["cls", "avg"])
def test_attention_selector_reads_the_attention_the_pooled_token_pays(pooling):
    selector = TokenSelector(CroprViTConfig(**tiny_config_kwargs(token_selector="attention", pooling=pooling)))
    probs = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    scores, aux_logits = selector(0, torch.randn(2, 5, 32), None, probs)
    expected = probs[:, :, 0].mean(dim=1) if pooling == "cls" else probs.mean(dim=(1, 2))
    assert aux_logits is None
    torch.testing.assert_close(scores, expected)


def test_random_scores_are_drawn_on_the_tokens_device():
    # The meta device stands in for an accelerator (index ops on meta tensors do not check devices, so a model-level
    # run would not notice CPU scores).
    selector = TokenSelector(CroprViTConfig(**tiny_config_kwargs(token_selector="random")))
    scores, _ = selector(0, torch.empty(2, 5, 32, device="meta"), None, None)
    assert scores.device.type == "meta" and scores.dtype == torch.float32
