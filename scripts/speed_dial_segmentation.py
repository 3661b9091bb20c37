"""One frozen segmentation model at every pruning rate: `python scripts/speed_dial_segmentation.py --help`.

Calibrates the per-patch Cropr modules of a frozen DINOv2-S/14 segmenter without labels and compares them with the
training-free selectors at each rate, writing docs/results_speed_dial_segmentation.{json,md,png} and a section of
docs/results.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds experiments/

from experiments.speed_dial_segmentation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
