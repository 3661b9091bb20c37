"""Push CroprViT checkpoints to the Hugging Face Hub: inference-only by default, with their image processor."""

from __future__ import annotations

import copy
import tempfile

from huggingface_hub import CommitInfo, HfApi
from transformers.image_processing_utils import ImageProcessingMixin

from ..models.cropr_vit.modeling_cropr_vit import CroprViTPreTrainedModel


def push_inference_checkpoint(
    model: CroprViTPreTrainedModel,
    repo_id: str,
    image_processor: ImageProcessingMixin | None = None,
    *,
    include_training_parameters: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload `model` (and `image_processor`) to `repo_id` in one commit, creating the repository if needed.

    By default the pushed weights are those of a stripped copy of `model` (`strip_training_modules()`: no Cropr
    queries, aggregators or auxiliary heads), so the checkpoint is smaller and loads as inference-only; `model` itself
    is never modified and can keep training. Pass `include_training_parameters=True` to push every parameter (to resume
    training elsewhere). The commit carries the config (with its `auto_map`), the model code for
    `trust_remote_code=True`, the safetensors weights and `preprocessor_config.json` when a processor is given, so
    `pipeline(task, model=repo_id)` needs nothing else.

    The remaining keyword arguments have the meaning of `HfApi.create_repo` (`private`) and `HfApi.upload_folder`.
    Returns the commit's `CommitInfo`.
    """
    if not isinstance(model, CroprViTPreTrainedModel):
        raise TypeError(f"`model` must be a CroprViT model, got {type(model).__name__}.")
    if image_processor is not None and not isinstance(image_processor, ImageProcessingMixin):
        raise TypeError(
            f"`image_processor` must be a transformers image processor, got {type(image_processor).__name__}."
        )
    if include_training_parameters and model.config.inference_only:
        raise ValueError(
            "`include_training_parameters=True` but this model was already stripped (`config.inference_only=True`): "
            "its training parameters are gone."
        )
    if include_training_parameters or model.config.inference_only:
        to_push = model
    else:
        to_push = copy.deepcopy(model).strip_training_modules()

    from .. import __version__

    api = HfApi(token=token, library_name="cropr", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        to_push.save_pretrained(folder)
        if image_processor is not None:
            image_processor.save_pretrained(folder)
        kind = "training" if include_training_parameters else "inference-only"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {kind} {type(model).__name__} checkpoint",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = ["push_inference_checkpoint"]
