"""Object detection with a pruned backbone at small scale: `python scripts/reproduce_detection.py --help`.

Trains Conditional DETR on CroprViT (DINOv2-S/14) with the none / cropr / random selectors and seeds 0-2, storing
each run in docs/results_detection.json and its report in a section of docs/results.md; rerun to add missing runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds experiments/

from experiments.reproduce_detection import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
