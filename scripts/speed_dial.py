"""One frozen model at every pruning rate: `python scripts/speed_dial.py --help`.

Calibrates the Cropr modules of a frozen DINOv2-S/14 without labels and compares them with the training-free
selectors at each rate, writing docs/results_speed_dial.{json,md,png} and a section of docs/results.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds experiments/

from experiments.speed_dial import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
