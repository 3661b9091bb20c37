"""Object detection with a CroprViT backbone: the code behind `scripts/train_object_detection.py`.

A transformers detector (Conditional DETR by default, or DETR) is built with `backbone_config=` a CroprViT config
(`CroprViTBackbone`, from a preset, or converted from any checkpoint `from_backbone` takes, with `--backbone`) and
trained with `Trainer` on the built-in detection scenes (`cropr.data.load_builtin_task("detection")`, COCO-style
boxes) or on a dataset of the same layout (`--dataset_name`: columns `image`, `image_id` and `objects` with COCO
`bbox` and `category`, as transformers' object-detection example reads).

The detector's loss ignores the Cropr modules; their auxiliary heads learn, as for the other tasks, from a loss added
here: the multi-hot set of the object classes in each image ([`CroprViTBackbone.auxiliary_loss`]), weighted by the
backbone config's `aux_loss_weight`. Evaluation reports COCO box mAP computed by `pycocotools` (`COCOeval`). At the end
the script saves the detector with its image processor and writes the mAP and the eval throughput of the whole model
and of its encoder alone, pruned and with pruning off at the same weights, to `all_results.json`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import DatasetDict, load_dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import (
    AutoImageProcessor,
    AutoModelForObjectDetection,
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    DetrConfig,
    DetrForObjectDetection,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    set_seed,
)
from transformers.models.conditional_detr.image_processing_pil_conditional_detr import (
    ConditionalDetrImageProcessorPil,
)
from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

from ..data import load_builtin_task
from ..data.images import to_rgb
from ..models.cropr_vit.modeling_cropr_vit import CroprViTBackbone, missing_outside_pruning_modules
from ..presets import preset_config
from ..tools.timing import measure_throughput
from .arguments import CroprTrainingArguments, DataArguments, ModelArguments, PruningArguments, RunError
from .run import check_finite
from .tasks import backbone_schedule

logger = logging.getLogger(__name__)

DETECTORS = {
    "conditional_detr": (ConditionalDetrConfig, ConditionalDetrForObjectDetection, ConditionalDetrImageProcessorPil),
    "detr": (DetrConfig, DetrForObjectDetection, DetrImageProcessorPil),
}
"""The detection heads the script builds: config, model and (torchvision-free) image processor classes."""


@dataclass
class DetectionArguments:
    detector: str = field(
        default="conditional_detr",
        metadata={"help": f"The detection head: {sorted(DETECTORS)} (Conditional DETR converges much faster)."},
    )
    num_object_queries: int = field(default=10, metadata={"help": "Object queries of the detector."})
    detector_width: int = field(default=128, metadata={"help": "Width (d_model) of the detector's transformer."})
    encoder_layers: int = field(default=1, metadata={"help": "Encoder layers of the detector."})
    decoder_layers: int = field(default=3, metadata={"help": "Decoder layers of the detector."})
    auxiliary_decoding_losses: bool = field(
        default=False,
        metadata={"help": "Add the detection loss of every decoder layer's output (DETR's `auxiliary_loss`)."},
    )
    backbone_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the backbone's pretrained weights (DETR trains them 10x slower than its fresh "
            "head); the detector and the Cropr modules use --learning_rate. Default: --learning_rate for all."
        },
    )
    frozen_backbone_blocks: int = field(
        default=0,
        metadata={
            "help": "Freeze the backbone's patch embedding and its first N blocks (the Cropr modules still train): "
            "fewer gradients to compute on a small budget."
        },
    )


def find_cropr_backbone(model: torch.nn.Module) -> CroprViTBackbone:
    """The `CroprViTBackbone` inside a detector (or any head built with `backbone_config=CroprViTConfig(...)`)."""
    backbones = [module for module in model.modules() if isinstance(module, CroprViTBackbone)]
    if len(backbones) != 1:
        raise ValueError(f"expected one CroprViTBackbone in {type(model).__name__}, found {len(backbones)}")
    return backbones[0]


def with_backbone_selector(model: PreTrainedModel, token_selector: str) -> PreTrainedModel:
    """A copy of the detector whose backbone has another token selector (same weights): `"none"` = pruning off."""
    variant = copy.deepcopy(model)
    backbone = find_cropr_backbone(variant)
    for name, module in variant.named_modules():
        if module is backbone:
            parent_name, _, attribute = name.rpartition(".")
            setattr(variant.get_submodule(parent_name), attribute, backbone.with_token_selector(token_selector))
    return variant.eval()


class DetectionTrainer(Trainer):
    """`Trainer` that adds the Cropr modules' auxiliary loss to the detector's, and reports COCO box mAP.

    `coco_eval_split` is the evaluation split before the transform (images and COCO `objects`), which the mAP reads.
    `backbone_learning_rate`, when given, is the learning rate of the backbone's pretrained weights (every backbone
    parameter outside the Cropr modules); the rest trains at `args.learning_rate`.
    """

    def __init__(self, *args, coco_eval_split, backbone_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.coco_eval_split = coco_eval_split
        self.backbone_learning_rate = backbone_learning_rate

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with each parameter group split in two when the backbone has its own learning rate:
        the scheduler scales every group from its own initial rate."""
        optimizer = super().create_optimizer(model)
        if self.backbone_learning_rate is None:
            return optimizer
        backbone = find_cropr_backbone(self.model if model is None else model)
        pretrained = {
            id(parameter) for name, parameter in backbone.named_parameters() if missing_outside_pruning_modules([name])
        }
        groups = []
        for group in optimizer.param_groups:
            head = [parameter for parameter in group["params"] if id(parameter) not in pretrained]
            body = [parameter for parameter in group["params"] if id(parameter) in pretrained]
            groups += [{**group, "params": head}, {**group, "params": body, "lr": self.backbone_learning_rate}]
        optimizer.param_groups = [group for group in groups if group["params"]]
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        backbone = find_cropr_backbone(model)
        recorded = {}
        hook = backbone.register_forward_hook(lambda module, args, output: recorded.update(aux=output.aux_logits))
        try:
            outputs = model(**inputs)
        finally:
            hook.remove()
        loss = outputs.loss
        aux_loss = backbone.auxiliary_loss(recorded.get("aux"), [target["class_labels"] for target in inputs["labels"]])
        if aux_loss is not None:
            loss = loss + backbone.config.aux_loss_weight * aux_loss
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The eval loss (Trainer's loop) and the COCO box metrics of `coco_eval_split`."""
        if eval_dataset is not None:
            raise ValueError(
                "DetectionTrainer evaluates the split it was built with (`eval_dataset` and `coco_eval_split`); build "
                "another trainer to evaluate another split."
            )
        metrics = super().evaluate(None, ignore_keys, metric_key_prefix)
        batch_size = self.args.per_device_eval_batch_size
        coco = coco_box_metrics(self.model, self.processing_class, self.coco_eval_split, batch_size)
        coco = {f"{metric_key_prefix}_{name}": value for name, value in coco.items()}
        self.log(coco)
        return {**metrics, **coco}


def coco_annotations(split) -> dict[str, Any]:
    """The ground truth of a COCO-style split as a COCO dataset dict (`images`, `annotations`, `categories`)."""
    names = split.features["objects"].feature["category"].names
    images, annotations = [], []
    for row in split.select_columns(["image_id", "width", "height", "objects"]):
        images.append({"id": row["image_id"], "width": row["width"], "height": row["height"]})
        for annotation in row["objects"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": row["image_id"],
                    "category_id": annotation["category"],
                    "bbox": list(annotation["bbox"]),
                    "area": annotation["area"],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": index, "name": name} for index, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


@torch.no_grad()
def predict_boxes(model, processor, split, batch_size: int) -> list[dict[str, Any]]:
    """COCO results (`image_id`, `category_id`, `bbox` as [x, y, width, height] in pixels, `score`) of every image."""
    model.eval()
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(split), batch_size):
        rows = split[start : start + batch_size]
        images = [to_rgb(image) for image in rows["image"]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        outputs = model(pixel_values=pixel_values)
        sizes = [(image.height, image.width) for image in images]
        detections = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        for image_id, detection in zip(rows["image_id"], detections, strict=True):
            for score, label, box in zip(detection["scores"], detection["labels"], detection["boxes"], strict=True):
                left, top, right, bottom = box.tolist()
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [left, top, right - left, bottom - top],
                        "score": float(score),
                    }
                )
    return results


def coco_box_metrics(model, processor, split, batch_size: int) -> dict[str, float]:
    """COCO box AP of the model on a COCO-style split, by `pycocotools`: `map` (IoU 0.50:0.95), `map_50`, `map_75`,
    `mar_100` (recall with 100 detections per image)."""
    detections = predict_boxes(model, processor, split, batch_size)
    names = ("map", "map_50", "map_75", "mar_100")
    if not detections:
        return dict.fromkeys(names, 0.0)
    # pycocotools prints its progress and summary table.
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = coco_annotations(split)
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"map": float(stats[0]), "map_50": float(stats[1]), "map_75": float(stats[2]), "mar_100": float(stats[8])}


def make_detection_transform(processor):
    """Images and their COCO annotations through the detector's image processor (boxes become normalised
    center-format `labels`, as the DETR losses read them)."""

    def transform(batch: dict[str, list]) -> dict[str, list]:
        annotations = [
            {
                "image_id": image_id,
                "annotations": [
                    {"bbox": list(obj["bbox"]), "category_id": obj["category"], "area": obj["area"], "iscrowd": 0}
                    for obj in objects
                ],
            }
            for image_id, objects in zip(batch["image_id"], batch["objects"], strict=True)
        ]
        images = [to_rgb(image) for image in batch["image"]]
        encoded = processor(images=images, annotations=annotations, return_tensors="pt")
        return {"pixel_values": list(encoded["pixel_values"]), "labels": list(encoded["labels"])}

    return transform


def collate_detection(examples: Sequence[dict]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": [example["labels"] for example in examples],
    }


def load_detection_data(data_args: DataArguments, seed: int) -> tuple[DatasetDict, dict[int, str]]:
    """The train/validation splits in the COCO-style layout and the class names."""
    if data_args.train_dir or data_args.validation_dir or data_args.image_column_name or data_args.label_column_name:
        raise RunError(
            "object detection reads the built-in scenes or a --dataset_name with columns image, image_id, width, "
            "height and objects (COCO bbox, category); --train_dir and the column options do not apply"
        )
    if data_args.dataset_name:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        if "validation" not in dataset:
            split = dataset["train"].train_test_split(test_size=0.1, seed=seed)
            dataset = DatasetDict(train=split["train"], validation=split["test"])
    else:
        dataset = load_builtin_task(
            "detection",
            num_train=data_args.num_train_samples,
            num_eval=data_args.num_eval_samples,
            image_size=data_args.canvas_size,
            seed=seed,
            source=data_args.fashion_mnist_dir,
        )
    for limit, split in ((data_args.max_train_samples, "train"), (data_args.max_eval_samples, "validation")):
        if limit is not None:
            dataset[split] = dataset[split].select(range(min(limit, len(dataset[split]))))
    names = dataset["train"].features["objects"].feature["category"].names
    return dataset, dict(enumerate(names))


def build_detector(
    model_args: ModelArguments,
    pruning_args: PruningArguments,
    detection_args: DetectionArguments,
    id2label: dict[int, str],
    image_size: int,
) -> tuple[PreTrainedModel, Any]:
    """The detector on a CroprViT backbone (preset, converted `--backbone`, or a saved detector) and its processor."""
    if model_args.model_name_or_path:
        model = AutoModelForObjectDetection.from_pretrained(model_args.model_name_or_path)
        find_cropr_backbone(model)
        return model, AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    if detection_args.detector not in DETECTORS:
        raise RunError(f"--detector must be one of {sorted(DETECTORS)}, got {detection_args.detector!r}")
    overrides = pruning_args.config_overrides()
    if model_args.drop_path_rate is not None:
        overrides["drop_path_rate"] = model_args.drop_path_rate
    label_kwargs = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
    backbone_weights = None
    if model_args.backbone:
        from ..conversion import from_backbone

        if "pruning_rate" not in overrides and "pruning_schedule" not in overrides:
            overrides["pruning_schedule"] = backbone_schedule(model_args.backbone, image_size, overrides)
        # The multi-label head's Cropr modules have the detection aux heads' shape: one query, one logit per class.
        converted, backbone_processor = from_backbone(
            model_args.backbone, "multi-label-classification", image_size=image_size, id2label=id2label, **overrides
        )
        backbone_config = converted.config
        backbone_weights = converted.base_model.state_dict()
        normalization = {"image_mean": backbone_processor.image_mean, "image_std": backbone_processor.image_std}
    else:
        backbone_config = preset_config(model_args.preset, image_size=image_size, **label_kwargs, **overrides)
        normalization = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    # Detection processors may resize to any size: the backbone resizes its position embeddings to match.
    backbone_config.interpolate_pos_encoding = True
    config_class, model_class, processor_class = DETECTORS[detection_args.detector]
    width, heads = detection_args.detector_width, max(detection_args.detector_width // 32, 1)
    config = config_class(
        backbone_config=backbone_config,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_queries=detection_args.num_object_queries,
        d_model=width,
        encoder_layers=detection_args.encoder_layers,
        decoder_layers=detection_args.decoder_layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * width,
        decoder_ffn_dim=4 * width,
        auxiliary_loss=detection_args.auxiliary_decoding_losses,
        **label_kwargs,
    )
    model = model_class(config)
    backbone = find_cropr_backbone(model)
    if backbone_weights is not None:
        backbone.load_state_dict(backbone_weights)
    frozen = detection_args.frozen_backbone_blocks
    if not 0 <= frozen <= len(backbone.layers):
        raise RunError(f"--frozen_backbone_blocks must be in [0, {len(backbone.layers)}] (the blocks), got {frozen}")
    if frozen:
        backbone.embeddings.requires_grad_(False)
        backbone.layers[:frozen].requires_grad_(False)
    processor = processor_class(size={"height": image_size, "width": image_size}, **normalization)
    return model, processor


def final_report(trainer: DetectionTrainer, eval_metrics: dict[str, float], eval_split, batch_size: int) -> dict:
    """mAP with pruning off at the same weights, and eval throughput of the whole detector and of its encoder."""
    model = trainer.model.eval()
    unpruned = with_backbone_selector(model, "none")
    unpruned_map = coco_box_metrics(unpruned, trainer.processing_class, eval_split, batch_size)["map"]
    rows = eval_split.select(range(min(batch_size, len(eval_split))))
    images = [to_rgb(image) for image in rows["image"]]
    pixel_values = trainer.processing_class(images=images, return_tensors="pt")["pixel_values"].to(model.device)
    whole = measure_throughput({"pruned": model, "unpruned": unpruned}, pixel_values)
    encoder = measure_throughput(
        {"pruned": find_cropr_backbone(model), "unpruned": find_cropr_backbone(unpruned)}, pixel_values
    )
    return {
        "eval_map_pruning_off": unpruned_map,
        "throughput_batch_size": pixel_values.shape[0],
        "model_images_per_second": whole["pruned"],
        "model_images_per_second_pruning_off": whole["unpruned"],
        "encoder_images_per_second": encoder["pruned"],
        "encoder_images_per_second_pruning_off": encoder["unpruned"],
        "flop_ceiling": find_cropr_backbone(model).config.flop_ceiling(),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, train, evaluate (COCO box mAP), save the detector and its processor; returns the metrics.

    Raises:
        RunError: conflicting arguments, or a diverged run.
    """
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, PruningArguments, DetectionArguments, CroprTrainingArguments)
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg.startswith("--output_dir") for arg in argv):
        argv += ["--output_dir", "outputs/detection"]
    model_args, data_args, pruning_args, detection_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.model_name_or_path and model_args.backbone:
        raise RunError("give either --model_name_or_path (a detector checkpoint) or --backbone, not both")
    if pruning_args.curriculum_ramp or pruning_args.aux_ignored_labels is not None:
        raise RunError("--curriculum_ramp and --aux_ignored_labels apply to the CroprViT task heads, not detection")
    if data_args.builtin_task not in (None, "detection"):
        raise RunError(
            f"this script trains object detection; its built-in task is 'detection', not {data_args.builtin_task!r}"
        )
    training_args.remove_unused_columns = False
    training_args.prediction_loss_only = True  # the metrics come from `coco_box_metrics`
    training_args.ddp_find_unused_parameters = False
    if not any(arg.split("=")[0] == "--max_grad_norm" for arg in argv):
        # As the other scripts: clipping the global norm would let the Cropr modules' aux gradients shrink the rest.
        training_args.max_grad_norm = 0.0
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    dataset, id2label = load_detection_data(data_args, training_args.data_seed or training_args.seed)
    image_size = model_args.image_size or data_args.canvas_size
    model, processor = build_detector(model_args, pruning_args, detection_args, id2label, image_size)
    backbone = find_cropr_backbone(model)
    logger.info(
        "%s on CroprViT (%s): tokens per block %s, FLOP ceiling %.2fx",
        type(model).__name__,
        backbone.config.token_selector,
        backbone.config.token_counts(),
        backbone.config.flop_ceiling(),
    )
    transform = make_detection_transform(processor)
    trainer = DetectionTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"].with_transform(transform),
        eval_dataset=dataset["validation"].with_transform(transform),
        data_collator=collate_detection,
        processing_class=processor,
        coco_eval_split=dataset["validation"],
        backbone_learning_rate=detection_args.backbone_learning_rate,
    )
    train_metrics = trainer.train().metrics
    trainer.log_metrics("train", train_metrics)
    eval_metrics = trainer.evaluate()
    check_finite(trainer.model, eval_metrics, training_args.output_dir, trained=True)
    report = final_report(trainer, eval_metrics, dataset["validation"], data_args.throughput_batch_size)
    eval_metrics.update(report)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_model(training_args.output_dir)
    print(
        f"\nbox mAP {eval_metrics['eval_map']:.4f} (pruning off: {report['eval_map_pruning_off']:.4f}); images/s "
        f"detector {report['model_images_per_second']:.1f} vs {report['model_images_per_second_pruning_off']:.1f}, "
        f"encoder {report['encoder_images_per_second']:.1f} vs {report['encoder_images_per_second_pruning_off']:.1f}"
        f"\nDetector and image processor saved to {os.path.abspath(training_args.output_dir)}"
    )
    return {"train": train_metrics, "eval": eval_metrics, "output_dir": training_args.output_dir}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `scripts/train_object_detection.py`: a [`RunError`] is reported as one line, exit status 1."""
    try:
        return run(argv)
    except RunError as error:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {error}")
