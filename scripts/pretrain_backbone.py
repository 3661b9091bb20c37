"""Pretrain the small ViT backbone shipped in the package (`src/cropr/pretrained/`), from the training split only.

Reproduces the committed checkpoint with its model card: `python scripts/pretrain_backbone.py` (48 minutes on the
2-core CPU its model card names). See `experiments/pretraining.py` for the recipe.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds experiments/

from experiments.pretraining import main  # noqa: E402

if __name__ == "__main__":
    main()
