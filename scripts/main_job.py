"""The main job: fine-tune a CroprViT on the built-in cluttered Fashion-MNIST task for a few minutes on a CPU.

From scratch by default (preset `vit-mini8-112`: 112 px, 8 px patches, 196 patches, 6 blocks of width 128, R=40 per
block + LLF);
`--backbone DIR_OR_HUB_ID` starts from ViT/DINOv2 weights instead, e.g. `--backbone ../shared/data/dinov2-small`.
Any `scripts/train_image_classification.py` option can be appended and overrides the defaults below. Prints eval
accuracy and eval throughput of the pruned model next to the same weights with pruning off, and where the stripped
checkpoint was saved.
"""

import sys

from cropr.training.run import main as run_training

DEFAULTS = [
    "--output_dir", "outputs/main-job",
    "--num_train_samples", "3000",
    "--num_eval_samples", "500",
    "--num_train_epochs", "2",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "64",
    "--learning_rate", "5e-4",
    "--weight_decay", "0.05",
    "--warmup_steps", "30",
    "--lr_scheduler_type", "cosine",
    "--eval_strategy", "epoch",
    "--save_strategy", "no",
    "--logging_steps", "20",
    "--dataloader_num_workers", "0",
    "--report_to", "none",
    "--seed", "0",
]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    defaults = list(DEFAULTS)
    if any(arg.startswith("--backbone") for arg in argv):
        # A pretrained backbone wants a gentler learning rate than training from scratch.
        defaults[defaults.index("--learning_rate") + 1] = "1e-4"
    results = run_training("image-classification", defaults + list(argv))
    if not any(arg.startswith(("--backbone", "--model_name_or_path")) for arg in argv):
        print(
            "\nTrained from scratch for a few CPU minutes, so accuracy stays low; for a useful model start from "
            "pretrained weights: make main ARGS='--backbone ../shared/data/dinov2-small' (or any ViT / DINOv2 Hub id)."
        )
    return results


if __name__ == "__main__":
    main()
