"""CroprViT: a Vision Transformer with Token Cropr pruning modules, as a transformers model family.

The three files of this folder are exactly what a saved checkpoint carries for `trust_remote_code=True`: they import
only each other (relatively), transformers and torch.

- `configuration_cropr_vit.py`: `CroprViTConfig`, its validation, schedules, token counts and FLOPs;
- `routing_cropr_vit.py`: the Cropr module (router), the baseline selectors, top-K selection and Last Layer Fusion;
- `modeling_cropr_vit.py`: embeddings, blocks, the backbone and the task heads.
"""

from .configuration_cropr_vit import CroprViTConfig
from .modeling_cropr_vit import (
    CroprViTBackbone,
    CroprViTBackboneOutput,
    CroprViTForImageClassification,
    CroprViTForMultiLabelClassification,
    CroprViTForSemanticSegmentation,
    CroprViTImageClassifierOutput,
    CroprViTModel,
    CroprViTModelOutput,
    CroprViTPreTrainedModel,
    CroprViTSemanticSegmenterOutput,
)

__all__ = [
    "CroprViTBackbone",
    "CroprViTBackboneOutput",
    "CroprViTConfig",
    "CroprViTForImageClassification",
    "CroprViTForMultiLabelClassification",
    "CroprViTForSemanticSegmentation",
    "CroprViTImageClassifierOutput",
    "CroprViTModel",
    "CroprViTModelOutput",
    "CroprViTPreTrainedModel",
    "CroprViTSemanticSegmenterOutput",
]
