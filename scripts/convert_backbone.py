"""Convert a pretrained ViT or DINOv2 checkpoint into a CroprViT model (same as `cropr convert`; see --help)."""

import sys

from cropr.conversion_cli import main

if __name__ == "__main__":
    sys.exit(main())
