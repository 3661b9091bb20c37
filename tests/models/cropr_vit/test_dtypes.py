"""Reduced precision: bf16 autocast on CPU (train and eval), bf16 weights, and fp16/bf16 on GPU when there is one."""

import pytest
import torch
from conftest import TASK_HEADS, build_tiny

from cropr.models.cropr_vit.configuration_cropr_vit import TOKEN_SELECTORS


def build(head: str, selector: str):
    torch.manual_seed(0)
    return build_tiny(head, token_selector=selector)


def labels_for(head: str, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if head == "classification":
        labels = torch.randint(0, 5, (2,), generator=generator)
    elif head == "multi_label":
        labels = torch.randint(0, 2, (2, 5), generator=generator).float()
    else:
        labels = torch.randint(0, 5, (2, 32, 32), generator=generator)
    return labels.to(device)


def kept_counts(output) -> list[int]:
    return [indices.shape[1] for indices in output.kept_indices]


def check_reduced_precision(model, head: str, device: str, dtype: torch.dtype) -> None:
    """Train step (forward, loss, backward) and eval forward under autocast; counts as in float32."""
    x = torch.randn(2, 3, 32, 32, device=device)
    model = model.to(device)
    with torch.no_grad():
        reference = model.eval()(x, output_kept_indices=True)
    with torch.autocast(device, dtype=dtype):
        output = model.train()(x, labels=labels_for(head, device), output_kept_indices=True)
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)  # losses are computed in float32
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        output = model.eval()(x, output_kept_indices=True)
    assert output.logits.dtype == dtype and torch.isfinite(output.logits).all()
    assert kept_counts(output) == kept_counts(reference)


@pytest.mark.parametrize("selector", TOKEN_SELECTORS)
@pytest.mark.parametrize("head", TASK_HEADS)
def test_bf16_autocast_on_cpu_trains_and_evaluates(head, selector):
    check_reduced_precision(build(head, selector), head, "cpu", torch.bfloat16)


@pytest.mark.parametrize("selector", TOKEN_SELECTORS)
@pytest.mark.parametrize("head", TASK_HEADS)
def test_bf16_weights_evaluate_float32_and_bf16_pixels(head, selector):
    model = build(head, selector).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x, output_kept_indices=True)
        model = model.to(torch.bfloat16)
        for pixels in (x, x.bfloat16()):
            output = model(pixels, output_kept_indices=True)
            assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.logits).all()
            assert kept_counts(output) == kept_counts(reference)
            if selector in ("none", "variance"):  # same tokens kept: outputs agree to bf16 precision
                assert torch.allclose(output.logits.float(), reference.logits, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("selector", TOKEN_SELECTORS)
@pytest.mark.parametrize("head", TASK_HEADS)
def test_autocast_on_gpu_trains_and_evaluates(head, selector, dtype):
    check_reduced_precision(build(head, selector), head, "cuda", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", TASK_HEADS)
def test_half_weights_on_gpu_evaluate(head, dtype):
    model = build(head, "cropr").to("cuda", dtype).eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 32, 32, device="cuda"), output_kept_indices=True)
    assert output.logits.dtype == dtype and torch.isfinite(output.logits).all()
