"""`cropr convert` / `scripts/convert_backbone.py`: a pretrained ViT or DINOv2 checkpoint into a CroprViT model,
saved with its image processor.

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

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .argtypes import bounded_int, output_dir
from .configuration_cropr_vit import TOKEN_SELECTORS
from .conversion import CONVERSION_TASKS, from_backbone


def parse_image_size(value: str) -> int | tuple[int, int]:
    """`224` or `224x320` (height x width), in pixels (at least 1)."""
    try:
        sides = [int(side) for side in value.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected an image size such as 224 or 224x320, got {value!r}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def parse_schedule(value: str) -> list[int]:
    """Comma-separated tokens removed after each block, e.g. `0,0,0,0,0,50,0,...`."""
    try:
        counts = [int(count) for count in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected token counts >= 0, got {value!r}")
    return counts


def load_id2label(value: str) -> dict[int, str]:
    """A JSON object `{"0": "cat", ...}` given inline or as the path of a JSON file."""
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"--id2label is neither a JSON file nor a JSON object: {value!r}") from None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError('--id2label must be a JSON object such as {"0": "cat", "1": "dog"}')
    return {int(index): str(label) for index, label in mapping.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cropr convert",
        description="Build a CroprViT model from a pretrained ViT / DINOv2 checkpoint (Hub id or local folder).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="Hub id (e.g. facebook/dinov2-small) or local checkpoint folder.")
    parser.add_argument("--task", choices=list(CONVERSION_TASKS), default="image-classification")
    parser.add_argument(
        "--output-dir", type=output_dir, required=True, help="Folder for the model and image processor."
    )
    parser.add_argument(
        "--image-size", type=parse_image_size, help="Resolution of the converted model (default: the source's)."
    )
    labels = parser.add_argument_group("labels (one is required for the classification and segmentation heads)")
    labels.add_argument("--num-labels", type=bounded_int(1))
    labels.add_argument("--id2label", type=load_id2label, help="JSON object or JSON file mapping ids to names.")

    pruning = parser.add_argument_group("pruning (CroprViTConfig fields; defaults are the config's)")
    pruning.add_argument("--token-selector", choices=TOKEN_SELECTORS)
    pruning.add_argument(
        "--pruning-rate", type=bounded_int(0), help="Tokens removed after every block (per-block schedule)."
    )
    pruning.add_argument("--pruning-schedule", type=parse_schedule, help="Tokens removed after each block: 0,16,...")
    pruning.add_argument("--last-layer-fusion", action=argparse.BooleanOptionalAction, default=None)
    pruning.add_argument("--pooling", choices=["avg", "cls"])
    pruning.add_argument("--aux-loss-weight", type=float)
    pruning.add_argument("--drop-path-rate", type=float)
    pruning.add_argument(
        "--interpolate-pos-encoding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Default of the forward argument (default: on for DINOv2, off for ViT).",
    )
    parser.add_argument("--revision", help="Revision of a Hub source.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in (
            "token_selector",
            "pruning_rate",
            "pruning_schedule",
            "last_layer_fusion",
            "pooling",
            "aux_loss_weight",
            "drop_path_rate",
            "interpolate_pos_encoding",
        )
        if getattr(args, name) is not None
    }
    model, image_processor = from_backbone(
        args.source,
        args.task,
        image_size=args.image_size,
        num_labels=args.num_labels,
        id2label=args.id2label,
        from_pretrained_kwargs={"revision": args.revision} if args.revision else None,
        **overrides,
    )
    model.save_pretrained(args.output_dir)
    image_processor.save_pretrained(args.output_dir)

    config = model.config
    print(f"Saved {type(model).__name__} and {type(image_processor).__name__} to {args.output_dir}")
    print(
        f"  image size {config.image_size_hw}, patch {config.patch_size_hw}, token selector {config.token_selector!r}"
    )
    if config.pruning_blocks:
        print(f"  tokens per block {config.token_counts()}, FLOP ceiling {config.flop_ceiling():.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
