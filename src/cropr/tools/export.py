"""ONNX export of eval CroprViT models.

Pruning counts (K per module) are Python integers taken from the config, so an exported graph has a static batch
size and image size: export once per shape you serve. The `topk` / `gather` / `scatter` routing ops export as plain
ONNX `TopK`, `GatherElements` and `ScatterElements`.

Two exporters exist in torch:

- the dynamo exporter (`dynamo=True`, torch's default; needs the `onnxscript` package);
- the legacy TorchScript exporter (`dynamo=False`), which needs no extra package.

Both export every selector, pruned or not, at the configured image size or another one.
"""

from __future__ import annotations

import importlib.util
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.cropr_vit.modeling_cropr_vit import CroprViTPreTrainedModel

DEFAULT_OPSET = 18


class _MainOutput(nn.Module):
    """Calls a CroprViT model on `pixel_values` and returns only its main tensor (logits, else last_hidden_state)."""

    def __init__(self, model: CroprViTPreTrainedModel, interpolate_pos_encoding: bool):
        super().__init__()
        self.model = model
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(
            pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding, return_dict=True
        )
        logits = getattr(outputs, "logits", None)
        return outputs.last_hidden_state if logits is None else logits


def main_output_name(model: CroprViTPreTrainedModel) -> str:
    """Name of the tensor `export_onnx` writes as the graph output: "logits" for task heads, else the features."""
    return "last_hidden_state" if model is model.base_model else "logits"


def export_onnx(
    model: CroprViTPreTrainedModel,
    path: str | PathLike,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
) -> Path:
    """Export an eval CroprViT model (backbone or task head) to an ONNX file with static input shape.

    Args:
        model: a CroprViT model in eval mode, ideally stripped with `strip_training_modules()`.
        path: the `.onnx` file to write (weights are stored inside it).
        image_size: input height and width; defaults to `config.image_size`. Another size exports with position
            embeddings interpolated to it.
        batch_size: the static batch size of the graph.
        opset: ONNX opset version.
        dynamo: use the dynamo exporter (needs `onnxscript`); `False` uses the legacy TorchScript exporter.

    Returns:
        The path written. The graph has one input, `pixel_values` (float32, `(batch_size, C, H, W)`), and one output,
        `logits` for task heads or `last_hidden_state` for a `CroprViTModel`.
    """
    if not isinstance(model, CroprViTPreTrainedModel):
        raise TypeError(f"export_onnx needs a CroprViT model, got {type(model).__name__}.")
    if model.training:
        raise ValueError("export_onnx exports the inference graph: call `model.eval()` first.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        raise ImportError(
            "The dynamo ONNX exporter needs the `onnxscript` package: `pip install onnxscript`, or use the legacy "
            "exporter (`dynamo=False`), which needs no extra package."
        )
    config = model.config
    if image_size is None:
        height, width = config.image_size_hw
    elif isinstance(image_size, int):
        height, width = image_size, image_size
    else:
        height, width = image_size
    interpolate = config.interpolate_pos_encoding or (height, width) != config.image_size_hw
    parameter = next(model.parameters())
    dummy = torch.randn(batch_size, config.num_channels, height, width, dtype=parameter.dtype, device=parameter.device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _MainOutput(model, interpolate).eval()
    export_kwargs = {"external_data": False} if dynamo else {}
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            dynamo=dynamo,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=[main_output_name(model)],
            **export_kwargs,
        )
    return path


def run_onnx(path: str | PathLike, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run an exported model with onnxruntime on CPU and return its single output as a numpy array."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if isinstance(pixel_values, torch.Tensor):
        pixel_values = pixel_values.detach().cpu().float().numpy()
    return session.run(None, {session.get_inputs()[0].name: pixel_values})[0]


__all__ = ["DEFAULT_OPSET", "export_onnx", "main_output_name", "run_onnx"]
