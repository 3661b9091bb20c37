"""cropr: Token Cropr (CVPR 2025) Vision Transformers as a transformers model family.

Importing the package registers `cropr_vit` with transformers' Auto classes and pipelines.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_BACKBONE_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from .conversion import SUPPORTED_MODEL_TYPES, from_backbone
from .models.cropr_vit import (
    CroprViTBackbone,
    CroprViTBackboneOutput,
    CroprViTConfig,
    CroprViTForImageClassification,
    CroprViTForMultiLabelClassification,
    CroprViTForSemanticSegmentation,
    CroprViTImageClassifierOutput,
    CroprViTModel,
    CroprViTModelOutput,
    CroprViTPreTrainedModel,
    CroprViTSemanticSegmenterOutput,
)

__version__ = "0.1.0"

AutoConfig.register(CroprViTConfig.model_type, CroprViTConfig, exist_ok=True)
AutoModel.register(CroprViTConfig, CroprViTModel, exist_ok=True)
AutoModelForImageClassification.register(CroprViTConfig, CroprViTForImageClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(CroprViTConfig, CroprViTForSemanticSegmentation, exist_ok=True)
# Detection, segmentation and depth heads build their backbone from `backbone_config` through AutoBackbone.
AutoBackbone.register(CroprViTConfig, CroprViTBackbone, exist_ok=True)
# Pipelines check these name tables to decide whether a model supports their task, and transformers' tools whether a
# class is a task head (with a loss) or the base model.
MODEL_MAPPING_NAMES.setdefault(CroprViTConfig.model_type, "CroprViTModel")
MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.setdefault(
    CroprViTConfig.model_type, ("CroprViTForImageClassification", "CroprViTForMultiLabelClassification")
)
MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(CroprViTConfig.model_type, "CroprViTForSemanticSegmentation")
MODEL_FOR_BACKBONE_MAPPING_NAMES.setdefault(CroprViTConfig.model_type, "CroprViTBackbone")

# Saved checkpoints carry the model code and an `auto_map`, so they load with `trust_remote_code=True` where this
# package is not installed.
CroprViTConfig.register_for_auto_class()
CroprViTModel.register_for_auto_class("AutoModel")
CroprViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CroprViTForMultiLabelClassification.register_for_auto_class("AutoModelForImageClassification")
CroprViTForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
CroprViTBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "from_backbone",
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
