"""torch.compile and ONNX export of eval CroprViT models (tiny configs).

torch.compile runs on the `aot_eager` backend (traced and decomposed like inductor, without its C++ build, which
takes ~40 s on two cores); set `CROPR_TEST_INDUCTOR=1` to also compile with inductor. The dynamo ONNX exporter needs
`onnxscript`; its tests are skipped where it is not installed.
"""

import os

import pytest
import torch
from conftest import tiny_config_kwargs

from cropr import CroprViTConfig, CroprViTForImageClassification, CroprViTModel
from cropr.tools.export import export_onnx, main_output_name, run_onnx

# The legacy exporter traces shapes and warns about every Python branch on them (also inside transformers).
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
]

COMPILE_CASES = [
    pytest.param("cropr", True, id="cropr-llf"),
    pytest.param("cropr", False, id="cropr-no-llf"),
    pytest.param("random", True, id="random-llf"),
]


def eval_classifier(selector: str, last_layer_fusion: bool = True, strip: bool = True):
    torch.manual_seed(0)
    config = CroprViTConfig(**tiny_config_kwargs(token_selector=selector, last_layer_fusion=last_layer_fusion))
    model = CroprViTForImageClassification(config).eval()
    return model.strip_training_modules() if strip else model


def pixel_values(batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("selector", "last_layer_fusion"), COMPILE_CASES)
def test_compile_fullgraph_no_graph_breaks(selector, last_layer_fusion):
    torch._dynamo.reset()
    model = eval_classifier(selector, last_layer_fusion)
    inputs = pixel_values()
    explanation = torch._dynamo.explain(model)(inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.manual_seed(3)
        eager = model(inputs, output_kept_indices=True)
        torch.manual_seed(3)
        traced = compiled(inputs, output_kept_indices=True)
    torch.testing.assert_close(traced.logits, eager.logits, rtol=0, atol=1e-5)
    for traced_index, eager_index in zip(traced.kept_indices, eager.kept_indices, strict=True):
        torch.testing.assert_close(traced_index, eager_index)


def test_compile_unstripped_eval_model_matches_eager():
    torch._dynamo.reset()
    model = eval_classifier("cropr", strip=False)
    inputs = pixel_values()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs).logits, model(inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.skipif(
    os.environ.get("CROPR_TEST_INDUCTOR") != "1", reason="inductor build is slow; CROPR_TEST_INDUCTOR=1"
)
def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    model = eval_classifier("cropr")
    inputs = pixel_values()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs).logits, model(inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("selector", "last_layer_fusion"), [("cropr", True), ("cropr", False), ("none", True)])
def test_onnx_dynamo_export_matches_pytorch(tmp_path, selector, last_layer_fusion):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = eval_classifier(selector, last_layer_fusion)
    path = export_onnx(model, tmp_path / "model.onnx", batch_size=2)
    inputs = pixel_values()
    with torch.no_grad():
        expected = model(inputs).logits
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, inputs)), expected, rtol=0, atol=1e-4)


def test_onnx_dynamo_export_backbone_feature_map(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = CroprViTModel(CroprViTConfig(**tiny_config_kwargs())).eval().strip_training_modules()
    assert main_output_name(model) == "last_hidden_state"
    path = export_onnx(model, tmp_path / "backbone.onnx", batch_size=1)
    inputs = pixel_values(batch_size=1)
    with torch.no_grad():
        expected = model(inputs).last_hidden_state
    output = torch.from_numpy(run_onnx(path, inputs))
    assert output.shape == (1, 17, 32)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-4)


def test_onnx_legacy_export_unpruned_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = eval_classifier("none")
    path = export_onnx(model, tmp_path / "model.onnx", batch_size=2, dynamo=False)
    inputs = pixel_values()
    with torch.no_grad():
        expected = model(inputs).logits
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, inputs)), expected, rtol=0, atol=1e-4)


def test_onnx_legacy_export_pruned(tmp_path):
    pytest.importorskip("onnxruntime")
    model = eval_classifier("cropr")
    path = export_onnx(model, tmp_path / "model.onnx", batch_size=2, dynamo=False)
    inputs = pixel_values()
    with torch.no_grad():
        expected = model(inputs).logits
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, inputs)), expected, rtol=0, atol=1e-4)


def test_export_onnx_rejects_training_mode_and_foreign_models(tmp_path):
    model = eval_classifier("none").train()
    with pytest.raises(ValueError, match="eval"):
        export_onnx(model, tmp_path / "model.onnx", dynamo=False)
    with pytest.raises(TypeError, match="CroprViT"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "model.onnx", dynamo=False)
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model.eval(), tmp_path / "model.onnx", batch_size=0, dynamo=False)
