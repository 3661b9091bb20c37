"""Train a transformers detector (Conditional DETR, or DETR) on a CroprViT backbone with Trainer (--help for options).

Built-in detection scenes by default (COCO-style boxes of Fashion-MNIST garments); --dataset_name for a dataset of the
same layout; --backbone to start from ViT / DINOv2 weights. Reports COCO box mAP (pycocotools) and the throughput of
the detector and of its encoder, pruned and with pruning off.
"""

from cropr.training.detection import main

if __name__ == "__main__":
    main()
