"""Benchmark CroprViT against transformers' ViT / DINOv2: `python scripts/benchmark.py --help`.

Final numbers (quiet machine): `python scripts/benchmark.py --preset vit-b16 --output results.json`.
"""

import sys

from cropr.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
