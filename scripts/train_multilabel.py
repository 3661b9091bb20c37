"""Fine-tune a CroprViT for multi-label-classification with Trainer (run with --help for every option).

Built-in data by default; --dataset_name / --train_dir for your own, --backbone to start from ViT/DINOv2 weights.
Runs unchanged under `accelerate launch` and `torchrun`.
"""

from cropr.training import main

if __name__ == "__main__":
    main("multi-label-classification")
