"""`make main`: fine-tune a CroprViT from the ViT backbone shipped in the package on the built-in cluttered
Fashion-MNIST task, next to the unpruned model trained the same way, and print what pruning costs and saves.

Runs offline in a few minutes on a 2-core CPU. `--backbone facebook/dinov2-small` (any ViT / DINOv2 Hub id or
folder) starts from other pretrained weights instead (downloaded, so it needs a network); `--quick` only checks that
everything runs. See `experiments/first_run.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds experiments/

from experiments.first_run import main  # noqa: E402

if __name__ == "__main__":
    main()
