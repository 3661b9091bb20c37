"""Built-in real data: Fashion-MNIST (located on disk, or a subset shipped in the package) and scene tasks built on it.

The public entry point is [`load_builtin_task`]; [`load_fashion_mnist`] gives the raw images and labels.
"""

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    IDXFormatError,
    find_fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
)
from .scenes import (
    TASKS,
    build_cluttered_classification,
    build_detection,
    build_multi_label,
    build_segmentation,
    id2label,
    label2id,
    load_builtin_task,
    num_labels,
    task_features,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "TASKS",
    "FashionMNIST",
    "IDXFormatError",
    "build_cluttered_classification",
    "build_detection",
    "build_multi_label",
    "build_segmentation",
    "find_fashion_mnist_dir",
    "id2label",
    "label2id",
    "load_builtin_task",
    "load_fashion_mnist",
    "num_labels",
    "read_idx",
    "task_features",
]
