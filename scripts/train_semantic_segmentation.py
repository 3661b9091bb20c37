"""Fine-tune a CroprViT for semantic-segmentation with Trainer (run with --help for every option).

Built-in data by default; --dataset_name / --train_dir for your own, --backbone to start from ViT/DINOv2 weights.
Runs unchanged under `accelerate launch` and `torchrun`.

Your own data: image and mask-image columns (--image_column_name, --label_column_name; scene_parse_150's
`annotation` is found by itself), class names from --id2label, --class_names or the dataset folder's id2label.json.
Mask value 0 is a class like any other unless --do_reduce_labels (ADE20k: 0 = unlabelled, k + 1 = class k); 255 is
ignored.
"""

from cropr.training.run import main

if __name__ == "__main__":
    main("semantic-segmentation")
