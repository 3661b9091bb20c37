"""Fine-tune a CroprViT for image-classification with Trainer (run with --help for every option).

Built-in data by default; --dataset_name / --train_dir for your own, --backbone to start from ViT/DINOv2 weights.
Runs unchanged under `accelerate launch` and `torchrun`.

Your own data: one class per image (a ClassLabel, integer or string column); --image_column_name and
--label_column_name name the columns, --class_names / --id2label the classes where the column does not.
"""

from cropr.training.run import main

if __name__ == "__main__":
    main("image-classification")
