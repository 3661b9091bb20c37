"""Same seed, same model, same outputs: initialisation, training forwards (dropout and drop-path on), every selector.

The random selector draws from `model.base_model.token_selector.generator` when one is set (independent of the global
RNG), otherwise from the global RNG.
"""

import pytest
import torch
from conftest import tiny_config_kwargs

from cropr import CroprViTConfig, CroprViTForImageClassification, CroprViTForSemanticSegmentation
from cropr.models.cropr_vit.configuration_cropr_vit import TOKEN_SELECTORS

STOCHASTIC = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.2)


def build(head: str, selector: str, seed: int, **overrides):
    torch.manual_seed(seed)
    if head == "segmentation":
        config = CroprViTConfig(**tiny_config_kwargs(token_selector=selector, num_queries=16, **overrides))
        return CroprViTForSemanticSegmentation(config)
    return CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs(token_selector=selector, **overrides)))


def labels_for(head: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (4, 32, 32) if head == "segmentation" else (4,)
    return torch.randint(0, 5, shape, generator=generator)


def run_once(model, head: str, seed: int, generator_seed: int | None = None) -> dict[str, object]:
    """One training step's loss, gradients and kept tokens, then eval logits, from a given global seed."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    selector = model.base_model.token_selector
    selector.generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    output = model.train()(x, labels=labels_for(head), output_kept_indices=True)
    output.loss.backward()
    with torch.no_grad():
        evaluated = model.eval()(x, output_kept_indices=True)
    return {
        "loss": output.loss.detach(),
        "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
        "train_kept": output.kept_indices,
        "eval_logits": evaluated.logits,
        "eval_kept": evaluated.kept_indices,
    }


def assert_identical(first: dict, second: dict) -> None:
    assert torch.equal(first["loss"], second["loss"])
    assert first["grads"].keys() == second["grads"].keys()
    for name, grad in first["grads"].items():
        assert torch.equal(grad, second["grads"][name]), name
    for key in ("train_kept", "eval_kept"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], second[key], strict=True)), key
    assert torch.equal(first["eval_logits"], second["eval_logits"])


@pytest.mark.parametrize("selector", TOKEN_SELECTORS)
@pytest.mark.parametrize("head", ["classification", "segmentation"])
def test_same_seed_gives_identical_weights_losses_gradients_and_outputs(head, selector):
    first, second = build(head, selector, seed=5, **STOCHASTIC), build(head, selector, seed=5, **STOCHASTIC)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(tensor, second_state[name]) for name, tensor in first_state.items())
    assert_identical(run_once(first, head, seed=9), run_once(second, head, seed=9))
    # And the same model twice: nothing carried over from the previous call changes the result.
    assert_identical(run_once(first, head, seed=9), run_once(second, head, seed=9))


def test_another_seed_gives_another_initialisation():
    first, second = build("classification", "cropr", seed=5), build("classification", "cropr", seed=6)
    assert not torch.equal(first.classifier.linear.weight, second.classifier.linear.weight)


def test_random_selector_generator_makes_it_independent_of_the_global_seed():
    model = build("classification", "random", seed=5)
    with_generator = run_once(model, "classification", seed=9, generator_seed=3)
    # Another global seed (no dropout in this model): the generator alone decides which tokens are kept.
    assert_identical(with_generator, run_once(model, "classification", seed=123, generator_seed=3))
    other_generator = run_once(model, "classification", seed=9, generator_seed=4)
    assert not torch.equal(with_generator["eval_kept"][0], other_generator["eval_kept"][0])
    # Without a generator the global seed decides.
    global_seed = run_once(model, "classification", seed=9)
    assert_identical(global_seed, run_once(model, "classification", seed=9))
    assert not torch.equal(global_seed["train_kept"][0], run_once(model, "classification", seed=10)["train_kept"][0])


@pytest.mark.parametrize("selector", TOKEN_SELECTORS)
def test_training_runs_under_deterministic_algorithms(selector):
    """`torch.use_deterministic_algorithms(True)` (Trainer's `full_determinism`) accepts every op of a train step."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_once(build("segmentation", selector, seed=5, **STOCHASTIC), "segmentation", seed=9)
        second = run_once(build("segmentation", selector, seed=5, **STOCHASTIC), "segmentation", seed=9)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_identical(first, second)
