"""Pretrained checkpoints shipped in the package, so that the first run needs no download.

`BACKBONE_DIR` is a plain transformers `ViTModel` checkpoint (a folder, as a Hub download would give):
`cropr.from_backbone(BACKBONE_DIR, "image-classification", num_labels=10)` turns it into a CroprViT. Its model card
(`README.md` in that folder) tells how `scripts/pretrain_backbone.py` trained it, on which data, and how well.
"""

from pathlib import Path

BACKBONE_NAME = "vit-fashion-p8-112"
BACKBONE_DIR = Path(__file__).resolve().parent / BACKBONE_NAME
"""The shipped ViT backbone: pass it to `cropr.from_backbone` or to `--backbone`."""

__all__ = ["BACKBONE_DIR", "BACKBONE_NAME"]
