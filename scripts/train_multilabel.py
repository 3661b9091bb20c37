"""Fine-tune a CroprViT for multi-label-classification with Trainer (run with --help for every option).

Built-in data by default; --dataset_name / --train_dir for your own, --backbone to start from ViT/DINOv2 weights.
Runs unchanged under `accelerate launch` and `torchrun`.

Your own data: per image a list of class ids or names of any length (e.g. Sequence(ClassLabel)), or a multi-hot
list with one value per class named by --class_names / --id2label; --image_column_name and --label_column_name name
the columns.
"""

from cropr.training.run import main

if __name__ == "__main__":
    main("multi-label-classification")
