"""transformers' detection, segmentation and depth heads on a pruned `CroprViTBackbone` (`backbone_config=`): forward,
loss, backward, save, reload and the matching pipeline, with tiny configs and without timm or torchvision."""

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image
from transformers import (
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    DetrConfig,
    DetrForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    pipeline,
)
from transformers.models.conditional_detr.image_processing_pil_conditional_detr import (
    ConditionalDetrImageProcessorPil,
)
from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil
from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

from cropr import CroprViTBackbone, CroprViTConfig

NUM_LABELS = 3
SIZE = {"height": 32, "width": 32}
# The heads' own options that keep them tiny and free of timm and of downloads.
NO_TIMM = dict(use_timm_backbone=False, use_pretrained_backbone=False)
DETR_TINY = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_queries=5,
)


def backbone_config(**overrides) -> CroprViTConfig:
    """The tiny CroprViT, pruning after blocks 0 and 1, at any input size (detection processors resize freely)."""
    return CroprViTConfig(**tiny_config_kwargs(num_labels=NUM_LABELS, interpolate_pos_encoding=True, **overrides))


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def detection_labels() -> list[dict]:
    return [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
    ]


def build(head: str):
    """(model, training inputs, image processor, pipeline task, output to compare) for each head."""
    if head in ("detr", "conditional_detr"):
        config_class, model_class, processor_class = {
            "detr": (DetrConfig, DetrForObjectDetection, DetrImageProcessorPil),
            "conditional_detr": (
                ConditionalDetrConfig,
                ConditionalDetrForObjectDetection,
                ConditionalDetrImageProcessorPil,
            ),
        }[head]
        config = config_class(backbone_config=backbone_config(), num_labels=NUM_LABELS, **NO_TIMM, **DETR_TINY)
        inputs = {"pixel_values": images(), "labels": detection_labels()}
        return model_class(config), inputs, processor_class(size=SIZE), "object-detection", "logits"
    if head == "mask2former":
        config = Mask2FormerConfig(
            backbone_config=backbone_config(out_indices=[1, 2, 3, 4]),
            num_labels=NUM_LABELS,
            hidden_dim=32,
            mask_feature_size=32,
            feature_size=32,
            encoder_feedforward_dim=32,
            dim_feedforward=32,
            num_queries=5,
            decoder_layers=2,
            encoder_layers=1,
            num_attention_heads=2,
            # Every stage of a ViT has the patch stride.
            feature_strides=[8, 8, 8, 8],
            **NO_TIMM,
        )
        masks = [torch.zeros(1, 32, 32), torch.ones(2, 32, 32)]
        masks[1][0, :16] = 0
        inputs = {
            "pixel_values": images(),
            "mask_labels": masks,
            "class_labels": [torch.tensor([0]), torch.tensor([1, 2])],
        }
        processor = Mask2FormerImageProcessorPil(size=SIZE)
        return (
            Mask2FormerForUniversalSegmentation(config),
            inputs,
            processor,
            "image-segmentation",
            "masks_queries_logits",
        )
    if head == "upernet":
        config = UperNetConfig(
            backbone_config=backbone_config(out_indices=[1, 2, 3, 4]),
            num_labels=NUM_LABELS,
            hidden_size=16,
            auxiliary_in_channels=32,
            auxiliary_channels=8,
            **NO_TIMM,
        )
        inputs = {"pixel_values": images(), "labels": torch.randint(0, NUM_LABELS, (2, 32, 32))}
        return (
            UperNetForSemanticSegmentation(config),
            inputs,
            SegformerImageProcessorPil(size=SIZE),
            "image-segmentation",
            "logits",
        )
    config = DepthAnythingConfig(
        # Depth Anything reads token sequences, CLS first, as from DINOv2.
        backbone_config=backbone_config(out_indices=[1, 2, 3, 4], reshape_hidden_states=False),
        patch_size=8,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        **NO_TIMM,
    )
    inputs = {"pixel_values": images()}
    return (
        DepthAnythingForDepthEstimation(config),
        inputs,
        DPTImageProcessorPil(size=SIZE),
        "depth-estimation",
        "predicted_depth",
    )


def cropr_backbone(model) -> CroprViTBackbone:
    (backbone,) = [module for module in model.modules() if isinstance(module, CroprViTBackbone)]
    return backbone


def class_labels(inputs: dict) -> list[torch.Tensor]:
    if "class_labels" in inputs:
        return inputs["class_labels"]
    if "labels" in inputs and isinstance(inputs["labels"], list):
        return [target["class_labels"] for target in inputs["labels"]]
    # Segmentation maps and depth: every class present in each image.
    maps = inputs.get("labels")
    return [labels.unique() for labels in maps] if maps is not None else [torch.tensor([0])] * 2


@pytest.mark.parametrize("head", ["detr", "conditional_detr", "mask2former", "upernet", "depth_anything"])
def test_head_on_pruned_backbone_trains_saves_reloads_and_runs_its_pipeline(head, tmp_path):
    torch.manual_seed(0)
    model, inputs, processor, task, output_name = build(head)
    backbone = cropr_backbone(model)
    assert backbone.config.pruning_blocks == [0, 1]

    # The heads drop the backbone's outputs but the Cropr modules' auxiliary logits: a hook hands them over.
    recorded = {}
    hook = backbone.register_forward_hook(lambda module, args, output: recorded.update(aux=output.aux_logits))
    model.train()
    outputs = model(**inputs)
    hook.remove()
    # Depth Anything computes no loss in transformers ("training is not implemented"): an L1 loss stands in.
    loss = outputs.loss if head != "depth_anything" else outputs.predicted_depth.abs().mean()
    aux_loss = backbone.auxiliary_loss(recorded["aux"], class_labels(inputs))
    (loss + backbone.config.aux_loss_weight * aux_loss).backward()
    assert torch.isfinite(loss) and torch.isfinite(aux_loss)
    assert backbone.embeddings.projection.weight.grad.abs().sum() > 0
    # Set-aside tokens still reach the head through the later stages' full maps.
    assert backbone.layers[1].mlp.fc2.weight.grad.abs().sum() > 0
    assert backbone.token_selector.routers["0"].queries.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        expected = getattr(model(pixel_values=inputs["pixel_values"]), output_name)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert cropr_backbone(reloaded).config.pruning_blocks == [0, 1]
    with torch.no_grad():
        assert torch.allclose(getattr(reloaded(pixel_values=inputs["pixel_values"]), output_name), expected, atol=1e-5)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    predictor = pipeline(task, model=str(tmp_path))
    # Untrained heads score low: threshold 0 keeps their boxes, and semantic maps always have a mask per class found.
    options = {"object-detection": {"threshold": 0.0}, "image-segmentation": {"subtask": "semantic"}}
    result = predictor(image, **options.get(task, {}))
    if task == "object-detection":
        assert result and set(result[0]) == {"score", "label", "box"}
    elif task == "image-segmentation":
        assert result and result[0]["mask"].size == image.size
    else:
        assert result["depth"].size == image.size
