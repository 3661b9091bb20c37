"""`scripts/convert_backbone.py`, the same as `cropr convert`: a pretrained ViT or DINOv2 checkpoint into a CroprViT
model, saved with its image processor.

Examples:

```bash
# ImageNet-21k ViT-B/16 -> 10-class Cropr classifier pruning 16 tokens after every block
python scripts/convert_backbone.py google/vit-base-patch16-224-in21k --task image-classification \\
    --num-labels 10 --pruning-rate 16 --output-dir vit-b16-cropr

# DINOv2-S/14 -> ADE20k-style segmenter at 518 px, labels from a JSON file {"0": "wall", ...}
python scripts/convert_backbone.py facebook/dinov2-small --task semantic-segmentation \\
    --id2label id2label.json --image-size 518 --pruning-rate 40 --output-dir dinov2-s-cropr-seg
```

The saved folder loads with `CroprViTFor*.from_pretrained(output_dir)` (or `AutoModel*` after `import cropr`, or with
`trust_remote_code=True` without the package) and `AutoImageProcessor.from_pretrained(output_dir)`.
"""

import sys

from cropr.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
