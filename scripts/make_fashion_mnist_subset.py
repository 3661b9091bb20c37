"""Regenerate `src/cropr/data/fashion_mnist_subset.npz`, the class-balanced Fashion-MNIST subset shipped in cropr.

The subset takes, for each of the 10 classes, the first `--train-per-class` images of the original training file and
the first `--test-per-class` images of the original test file, in file order (the files are already shuffled), so it
is deterministic and never mixes the original splits. It stores the images, labels and their indices in the
original files (`train_indices`, `test_indices`) for provenance.

Usage:
    python scripts/make_fashion_mnist_subset.py [--source DIR] [--output PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cropr.data.fashion_mnist import NUM_CLASSES, SUBSET_PATH, find_fashion_mnist_dir, load_fashion_mnist


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` examples of each class, sorted (file order)."""
    chosen = []
    for class_id in range(NUM_CLASSES):
        indices = np.flatnonzero(labels == class_id)[:per_class]
        if len(indices) < per_class:
            raise ValueError(f"class {class_id} has only {len(indices)} examples, fewer than {per_class}")
        chosen.append(indices)
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=None, help="directory with the four original IDX files")
    parser.add_argument("--output", type=Path, default=SUBSET_PATH, help="where to write the .npz subset")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()

    if find_fashion_mnist_dir(args.source) is None:
        parser.error("the full Fashion-MNIST IDX files were not found; pass --source DIR")
    data = load_fashion_mnist(args.source)
    train_indices = first_per_class(data.train_labels, args.train_per_class)
    test_indices = first_per_class(data.test_labels, args.test_per_class)
    np.savez_compressed(
        args.output,
        train_images=data.train_images[train_indices],
        train_labels=data.train_labels[train_indices],
        test_images=data.test_images[test_indices],
        test_labels=data.test_labels[test_indices],
        train_indices=train_indices.astype(np.int32),
        test_indices=test_indices.astype(np.int32),
    )
    print(
        f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB): {len(train_indices)} train and "
        f"{len(test_indices)} test images from {data.source}"
    )


if __name__ == "__main__":
    main()
