"""`scripts/train_object_detection.py` (`cropr.training.detection`): a detector on a CroprViT backbone, COCO mAP."""

import json

import pytest
import torch
from conftest import TINY_RUN
from transformers import TrainingArguments, pipeline
from transformers.modeling_outputs import ModelOutput
from transformers.models.conditional_detr.image_processing_pil_conditional_detr import (
    ConditionalDetrImageProcessorPil,
)

from cropr.data import load_builtin_task
from cropr.training.arguments import ModelArguments, PruningArguments, RunError
from cropr.training.detection import (
    DetectionArguments,
    DetectionTrainer,
    build_detector,
    coco_box_metrics,
    find_cropr_backbone,
    run,
)

# The classification runs' tiny settings, minus the multi-label/segmentation-only ones, on 16 + 8 scenes.
DETECTION_RUN = [
    *TINY_RUN,
    "--num_train_samples",
    "16",
    "--num_eval_samples",
    "8",
    "--throughput_batch_size",
    "4",
    "--fashion_mnist_dir",
    "subset",
    "--num_object_queries",
    "6",
    "--detector_width",
    "32",
]


class PerfectDetector(torch.nn.Module):
    """Returns each scene's ground-truth boxes with high scores (in the processor's normalised center format), and
    low-scored filler for the remaining queries: COCO AP must be 1."""

    def __init__(self, split, num_queries: int = 6, num_labels: int = 10):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.split, self.num_queries, self.num_labels, self.seen = split, num_queries, num_labels, 0

    def forward(self, pixel_values):
        logits = torch.full((len(pixel_values), self.num_queries, self.num_labels), -10.0)
        boxes = torch.full((len(pixel_values), self.num_queries, 4), 0.1)
        for image in range(len(pixel_values)):
            row = self.split[self.seen]
            for query, annotation in enumerate(row["objects"]):
                left, top, width, height = annotation["bbox"]
                center = [(left + width / 2) / row["width"], (top + height / 2) / row["height"]]
                boxes[image, query] = torch.tensor([*center, width / row["width"], height / row["height"]])
                logits[image, query, annotation["category"]] = 10.0
            self.seen += 1
        return ModelOutput(logits=logits, pred_boxes=boxes)


def test_coco_metrics_of_the_ground_truth_are_perfect():
    split = load_builtin_task("detection", num_train=1, num_eval=5, image_size=64, source="subset")["validation"]
    processor = ConditionalDetrImageProcessorPil(size={"height": 64, "width": 64})
    metrics = coco_box_metrics(PerfectDetector(split), processor, split, batch_size=2)
    assert metrics == pytest.approx({"map": 1.0, "map_50": 1.0, "map_75": 1.0, "mar_100": 1.0})


def test_tiny_run_writes_metrics_and_a_detector_the_pipeline_loads(tmp_path):
    results = run([*DETECTION_RUN, "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "all_results.json").read_text())
    for key in (
        "eval_map",
        "eval_map_50",
        "eval_map_pruning_off",
        "model_images_per_second",
        "encoder_images_per_second",
    ):
        assert key in saved and saved[key] >= 0
    assert saved["eval_map"] == results["eval"]["eval_map"]
    detector = pipeline("object-detection", model=str(tmp_path))
    assert find_cropr_backbone(detector.model).config.pruning_blocks == [0, 1]
    image = load_builtin_task("detection", num_train=1, num_eval=1, image_size=56, source="subset")["train"][0]["image"]
    assert all(set(found) == {"score", "label", "box"} for found in detector(image, threshold=0.0))


def test_options_of_other_tasks_are_refused(tmp_path):
    with pytest.raises(RunError, match="curriculum_ramp"):
        run([*DETECTION_RUN, "--output_dir", str(tmp_path), "--curriculum_ramp", "0.5"])
    with pytest.raises(RunError, match="built-in task is 'detection'"):
        run([*DETECTION_RUN, "--output_dir", str(tmp_path), "--builtin_task", "segmentation"])


def test_frozen_backbone_blocks_keep_the_cropr_modules_training():
    labels = dict(enumerate("abc"))
    model, _ = build_detector(
        ModelArguments(preset="tiny"), PruningArguments(), DetectionArguments(frozen_backbone_blocks=2), labels, 32
    )
    backbone = find_cropr_backbone(model)
    assert not any(parameter.requires_grad for parameter in backbone.embeddings.parameters())
    assert not any(parameter.requires_grad for parameter in backbone.layers[:2].parameters())
    assert all(parameter.requires_grad for parameter in backbone.layers[2:].parameters())
    assert all(parameter.requires_grad for parameter in backbone.token_selector.parameters())
    with pytest.raises(RunError, match=r"frozen_backbone_blocks must be in \[0, 4\]"):
        build_detector(
            ModelArguments(preset="tiny"), PruningArguments(), DetectionArguments(frozen_backbone_blocks=5), labels, 32
        )


def test_backbone_learning_rate_applies_to_the_pretrained_backbone_weights_only(tmp_path):
    model, _ = build_detector(
        ModelArguments(preset="tiny"), PruningArguments(), DetectionArguments(), dict(enumerate("abc")), 32
    )
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none", use_cpu=True)
    trainer = DetectionTrainer(model=model, args=args, coco_eval_split=None, backbone_learning_rate=1e-5)
    rates = {
        id(parameter): group["lr"] for group in trainer.create_optimizer().param_groups for parameter in group["params"]
    }
    backbone = find_cropr_backbone(model)
    assert {rates[id(parameter)] for parameter in backbone.layers.parameters()} == {1e-5}
    assert {rates[id(parameter)] for parameter in backbone.token_selector.parameters()} == {1e-3}
    assert {rates[id(parameter)] for parameter in model.class_labels_classifier.parameters()} == {1e-3}
    assert len(rates) == sum(1 for parameter in model.parameters() if parameter.requires_grad)


def test_auxiliary_decoding_losses_reach_the_detector_config():
    labels = dict(enumerate("abc"))
    model, _ = build_detector(
        ModelArguments(preset="tiny"),
        PruningArguments(),
        DetectionArguments(auxiliary_decoding_losses=True),
        labels,
        32,
    )
    assert model.config.auxiliary_loss
