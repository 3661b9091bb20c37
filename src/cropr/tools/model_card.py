"""Model cards for CroprViT checkpoints, filled only from what was measured.

`generate_model_card(model, measurements)` renders `CARD_TEMPLATE` (the single source of the card's layout; the
readable copy `model_cards/template.md` is generated from it) from two sources:

- the model and its config: architecture, keep schedule, token counts, parameters (full and with the training-only
  modules stripped), analytic GMACs and the FLOP ceiling;
- a measurements file (JSON, schema below): base model and its license, dataset, measured speedups and metrics.

The generator never writes a number it was not given: a missing speed or metric measurement becomes an explicit
"not measured" line, and a missing required field raises `MeasurementsError` naming the field.

Measurements schema (version 1); keys marked * are required, unknown keys are rejected::

    {
      "schema_version": 1,                          *  must be 1
      "repo_id": "user/cropr-vit-b16-in1k",            Hub id for the usage snippet and title (default: folder name)
      "license": "apache-2.0",                         license of this checkpoint (default: the base model's)
      "base_model": {                               *
        "id": "google/vit-base-patch16-224",        *  Hub id of the backbone the checkpoint was trained from
        "license": "apache-2.0",                    *  that backbone's license (Hub license id)
        "name": "ViT-B/16"                             display name (default: id)
      },
      "dataset": {                                  *
        "id": "imagenet-1k",                        *  Hub dataset id (training and evaluation dataset)
        "name": "ImageNet-1k",                         display name (default: id)
        "split": "validation"                          split the metrics were measured on
      },
      "speed": [                                       one entry per setup; absent or empty = "not measured"
        {"speedup": 1.58,                           *  throughput of this model over the unpruned model
         "hardware": "NVIDIA A100-SXM4-80GB",       *
         "dtype": "float16",                        *
         "batch_size": 256,                         *
         "torch_version": "2.5.1",                  *
         "throughput": 2100.0,                         images/s of this model
         "baseline_throughput": 1330.0,                images/s of the unpruned model
         "notes": "SDPA, torch.compile"}
      ],
      "metrics": [                                     absent or empty = "not measured"
        {"type": "accuracy",                        *  Hub metric id
         "value": 81.2,                             *  this model's value
         "name": "Top-1 accuracy (%)",                 display name (default: type)
         "baseline": 81.8}                             the unpruned model's value (absent = "not measured")
      ]
    }
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCardData

from ..models.cropr_vit.configuration_cropr_vit import LEARNED_SELECTORS, CroprViTConfig
from ..models.cropr_vit.modeling_cropr_vit import (
    CroprViTForImageClassification,
    CroprViTForSemanticSegmentation,
    CroprViTPreTrainedModel,
)

SCHEMA_VERSION = 1
NOT_MEASURED = "not measured"
PAPER_URL = "https://arxiv.org/abs/2412.00965"
CITATION = """@inproceedings{bergner2025tokencropr,
  title     = {Token Cropr: Faster ViTs for Quite a Few Tasks},
  author    = {Bergner, Benjamin and Lippert, Christoph and Mahendran, Aravindh},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025},
  eprint    = {2412.00965},
  archivePrefix = {arXiv}
}"""

CARD_TEMPLATE = """\
---
${front_matter}
---

# ${title}

A [Token Cropr](${paper_url}) Vision Transformer for ${task_name} on ${dataset_name}, trained from \
[${base_name}](https://huggingface.co/${base_id}). Pruning modules set tokens aside after chosen blocks (those the \
token selector scores lowest), so later blocks run on fewer tokens.

## Model details

${details}

### Keep schedule

${schedule}

## Speed

${speed}

## Evaluation

${evaluation}

## Usage

${usage}

## Limitations

${limitations}

## Citation

```bibtex
${citation}
```
"""


class MeasurementsError(ValueError):
    """A measurements file is missing a required field or holds a value of the wrong type."""


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseModelInfo:
    id: str
    license: str
    name: str


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    name: str
    split: str | None


@dataclass(frozen=True)
class SpeedMeasurement:
    speedup: float
    hardware: str
    dtype: str
    batch_size: int
    torch_version: str
    throughput: float | None = None
    baseline_throughput: float | None = None
    notes: str | None = None


@dataclass(frozen=True)
class MetricMeasurement:
    type: str
    value: float
    name: str
    baseline: float | None = None


@dataclass(frozen=True)
class Measurements:
    """Validated contents of a measurements file (see the module docstring for the schema)."""

    base_model: BaseModelInfo
    dataset: DatasetInfo
    repo_id: str | None = None
    license: str | None = None
    speed: list[SpeedMeasurement] = field(default_factory=list)
    metrics: list[MetricMeasurement] = field(default_factory=list)

    @property
    def card_license(self) -> str:
        return self.license or self.base_model.license


_FIELD_HINTS = {
    "base_model": 'an object with the backbone\'s Hub "id" and "license"',
    "base_model.id": 'the Hub id of the backbone, e.g. "google/vit-base-patch16-224"',
    "base_model.license": 'the license of the base backbone, e.g. "apache-2.0"',
    "dataset": 'an object with the dataset\'s Hub "id"',
    "dataset.id": 'the Hub id of the dataset, e.g. "imagenet-1k"',
}


class _Reader:
    """Reads one JSON object, naming the full field path in every error."""

    def __init__(self, data: Any, path: str, allowed: tuple[str, ...]):
        where = f"`{path}`" if path else "the measurements"
        if not isinstance(data, Mapping):
            raise MeasurementsError(f"{where} must be a JSON object, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise MeasurementsError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(allowed)}.")
        self.data, self.path = data, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _missing(self, key: str) -> MeasurementsError:
        name = self._name(key)
        generic = name.replace("[", ".").split(".")[0]
        hint = _FIELD_HINTS.get(name) or _FIELD_HINTS.get(generic)
        return MeasurementsError(f"measurements: `{name}` is required" + (f" ({hint})." if hint else "."))

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self._missing(key)
            return None
        if not isinstance(value, str) or not value.strip():
            raise MeasurementsError(f"measurements: `{self._name(key)}` must be a non-empty string, got {value!r}.")
        return value.strip()

    def number(self, key: str, required: bool = True, integer: bool = False) -> float | int | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self._missing(key)
            return None
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            kind = "an integer" if integer else "a number"
            raise MeasurementsError(f"measurements: `{self._name(key)}` must be {kind}, got {value!r}.")
        return value

    def child(self, key: str, allowed: tuple[str, ...]) -> _Reader:
        if self.data.get(key) is None:
            raise self._missing(key)
        return _Reader(self.data[key], self._name(key), allowed)

    def entries(self, key: str, allowed: tuple[str, ...]) -> list[_Reader]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise MeasurementsError(f"measurements: `{self._name(key)}` must be a list, got {type(value).__name__}.")
        return [_Reader(item, f"{self._name(key)}[{index}]", allowed) for index, item in enumerate(value)]


def parse_measurements(data: Any) -> Measurements:
    """Validate a decoded measurements object; raises `MeasurementsError` naming the first bad field."""
    root = _Reader(data, "", ("schema_version", "repo_id", "license", "base_model", "dataset", "speed", "metrics"))
    version = root.number("schema_version", integer=True)
    if version != SCHEMA_VERSION:
        raise MeasurementsError(
            f"measurements: `schema_version` {version} is not supported (expected {SCHEMA_VERSION})."
        )
    base = root.child("base_model", ("id", "license", "name"))
    base_id = base.text("id")
    dataset = root.child("dataset", ("id", "name", "split"))
    dataset_id = dataset.text("id")
    speed = [
        SpeedMeasurement(
            speedup=entry.number("speedup"),
            hardware=entry.text("hardware"),
            dtype=entry.text("dtype"),
            batch_size=entry.number("batch_size", integer=True),
            torch_version=entry.text("torch_version"),
            throughput=entry.number("throughput", required=False),
            baseline_throughput=entry.number("baseline_throughput", required=False),
            notes=entry.text("notes", required=False),
        )
        for entry in root.entries(
            "speed",
            (
                "speedup",
                "hardware",
                "dtype",
                "batch_size",
                "torch_version",
                "throughput",
                "baseline_throughput",
                "notes",
            ),
        )
    ]
    metrics = []
    for entry in root.entries("metrics", ("type", "value", "name", "baseline")):
        metric_type = entry.text("type")
        metrics.append(
            MetricMeasurement(
                type=metric_type,
                value=entry.number("value"),
                name=entry.text("name", required=False) or metric_type,
                baseline=entry.number("baseline", required=False),
            )
        )
    return Measurements(
        base_model=BaseModelInfo(id=base_id, license=base.text("license"), name=base.text("name", False) or base_id),
        dataset=DatasetInfo(
            id=dataset_id, name=dataset.text("name", False) or dataset_id, split=dataset.text("split", False)
        ),
        repo_id=root.text("repo_id", required=False),
        license=root.text("license", required=False),
        speed=speed,
        metrics=metrics,
    )


def load_measurements(path: str | Path) -> Measurements:
    """Read and validate a measurements JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MeasurementsError(f"{path} is not valid JSON: {error}.") from None
    return parse_measurements(data)


# ----------------------------------------------------------------------------------------------------------------------
# Values computed from the model
# ----------------------------------------------------------------------------------------------------------------------
def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def parameter_counts(model: CroprViTPreTrainedModel) -> tuple[int, int]:
    """(full, stripped) parameter counts: with and without the training-only Cropr modules.

    A checkpoint saved after `strip_training_modules()` no longer holds its training modules; their count is then
    taken from the same architecture built on the meta device (no memory, no weights).
    """
    if model.config.inference_only:
        config = copy.deepcopy(model.config)
        config.inference_only = False
        with torch.device("meta"):
            full = count_parameters(type(model)(config))
        return full, count_parameters(model)
    return count_parameters(model), count_parameters(copy.deepcopy(model).strip_training_modules())


def task_of(model: torch.nn.Module) -> tuple[str, str]:
    """(pipeline tag, task name) of a CroprViT task model; raises `ValueError` for anything else."""
    if isinstance(model, CroprViTForSemanticSegmentation):
        return "image-segmentation", "semantic segmentation"
    if isinstance(model, CroprViTForImageClassification):
        if model.config.problem_type == "multi_label_classification":
            return "image-classification", "multi-label image classification"
        return "image-classification", "image classification"
    raise ValueError(f"A model card needs a CroprViT classification or segmentation model, got {type(model).__name__}.")


def _gmacs(macs: int) -> str:
    return f"{macs / 1e9:.4g}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M ({count:,})"


# ----------------------------------------------------------------------------------------------------------------------
# Card sections
# ----------------------------------------------------------------------------------------------------------------------
def _front_matter(measurements: Measurements, pipeline_tag: str, title: str) -> str:
    dataset = measurements.dataset
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset.id,
            dataset_name=dataset.name,
            dataset_split=dataset.split,
            metric_type=metric.type,
            metric_name=metric.name,
            metric_value=metric.value,
        )
        for metric in measurements.metrics
    ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=measurements.card_license,
        base_model=measurements.base_model.id,
        datasets=[dataset.id],
        metrics=sorted({metric.type for metric in measurements.metrics}) or None,
        tags=["cropr", "token-pruning", "vision", "vision-transformer", pipeline_tag],
        model_name=title,
        eval_results=eval_results or None,
    )
    return data.to_yaml()


def _details(model: CroprViTPreTrainedModel, measurements: Measurements, task_name: str) -> str:
    config: CroprViTConfig = model.config
    base = measurements.base_model
    (height, width), (patch_h, patch_w) = config.image_size_hw, config.patch_size_hw
    full, stripped = parameter_counts(model)
    learned = config.token_selector in LEARNED_SELECTORS
    queries = str(config.num_queries) if learned else f"none (`{config.token_selector}` selector, no learned queries)"
    blocks = ", ".join(str(block) for block in config.pruning_blocks) or "none"
    rows = [
        ("Base model", f"[{base.name}](https://huggingface.co/{base.id}), license `{base.license}`"),
        ("This checkpoint's license", f"`{measurements.card_license}`"),
        ("Task", task_name),
        ("Dataset", f"[{measurements.dataset.name}](https://huggingface.co/datasets/{measurements.dataset.id})"),
        (
            "Backbone",
            f"{config.num_hidden_layers} blocks, width {config.hidden_size}, {config.num_attention_heads} heads, "
            f"patch {patch_h}x{patch_w}, input {height}x{width}, CLS token: {'yes' if config.use_cls_token else 'no'}",
        ),
        ("Token selector", f"`{config.token_selector}`"),
        ("Pruning modules after blocks (0-based)", blocks),
        ("Last Layer Fusion (LLF)", "yes" if config.last_layer_fusion else "no"),
        ("Queries per module", queries),
        ("Parameters, full (with training-only modules)", _millions(full)),
        ("Parameters, stripped (inference checkpoint)", _millions(stripped)),
        ("Backbone GMACs per image, unpruned (analytic)", _gmacs(config.flops(pruned=False))),
        ("Backbone GMACs per image, pruned (analytic)", _gmacs(config.flops(pruned=True))),
        ("FLOP ceiling (unpruned / pruned GMACs)", f"{config.flop_ceiling():.2f}x"),
    ]
    lines = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines)


def _schedule(config: CroprViTConfig) -> str:
    counts, removed = config.token_counts(), config.effective_pruning_schedule
    arrow = " → ".join(str(count) for count in counts)
    prefix = " (CLS included)" if config.use_cls_token else ""
    rows = "\n".join(f"| {block} | {count} | {removed[block]} |" for block, count in enumerate(counts))
    llf = (
        " With Last Layer Fusion the last block sees every token again."
        if config.last_layer_fusion and config.pruning_blocks
        else ""
    )
    return (
        f"Tokens each block sees{prefix}, at {config.image_size_hw[0]}x{config.image_size_hw[1]}: {arrow}.{llf}\n\n"
        "<details><summary>Per block</summary>\n\n"
        "| block (0-based) | tokens in | tokens dropped after it |\n|---|---|---|\n"
        f"{rows}\n\n</details>"
    )


def _speed(measurements: Measurements) -> str:
    if not measurements.speed:
        return f"Speed: {NOT_MEASURED}."
    header = (
        "| speedup vs unpruned | hardware | dtype | batch size | torch | images/s (this model) | images/s (unpruned) "
        "| notes |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {entry.speedup}x | {entry.hardware} | {entry.dtype} | {entry.batch_size} | {entry.torch_version} "
        f"| {_given(entry.throughput)} | {_given(entry.baseline_throughput)} | {entry.notes or ''} |"
        for entry in measurements.speed
    ]
    return "Measured throughput (not the analytic FLOP ceiling above):\n\n" + "\n".join([header, *rows])


def _evaluation(measurements: Measurements) -> str:
    if not measurements.metrics:
        return f"Evaluation: {NOT_MEASURED}."
    split = f", split `{measurements.dataset.split}`" if measurements.dataset.split else ""
    header = "| metric | this model | unpruned baseline |\n|---|---|---|"
    rows = [f"| {metric.name} | {metric.value} | {_given(metric.baseline)} |" for metric in measurements.metrics]
    return f"On {measurements.dataset.name}{split}:\n\n" + "\n".join([header, *rows])


def _given(value: float | None) -> str:
    return NOT_MEASURED if value is None else str(value)


def _usage(repo_id: str, pipeline_tag: str) -> str:
    auto_class = (
        "AutoModelForSemanticSegmentation"
        if pipeline_tag == "image-segmentation"
        else ("AutoModelForImageClassification")
    )
    return f"""```python
import cropr  # registers the `cropr_vit` model type with transformers
from transformers import AutoImageProcessor, {auto_class}, pipeline

model = {auto_class}.from_pretrained("{repo_id}")
image_processor = AutoImageProcessor.from_pretrained("{repo_id}")
predictor = pipeline("{pipeline_tag}", model=model, image_processor=image_processor)
predictions = predictor("path/or/url/to/image.jpg")
```

Without the `cropr` package, load with `trust_remote_code=True`: the checkpoint carries its model code. The heat-map of
which patches each block dropped: `cropr visualize <checkpoint> image.jpg`."""


def _limitations(config: CroprViTConfig) -> str:
    output = (
        "the output is the full token map, in raster order"
        if config.last_layer_fusion
        else "the output holds only the tokens kept by the last module"
    )
    return "\n".join(
        [
            "- **Fixed K per image**: every image keeps the same number of tokens after each module, whatever its "
            "content; easy images are not pruned harder than hard ones.",
            f"- **Resolution**: the schedule is set for {config.image_size_hw[0]}x{config.image_size_hw[1]}; at "
            "other sizes each module drops the same share of the patches.",
            f"- **Output**: {output}.",
            "- **Export**: ONNX export with static K only: token counts are fixed at export time for one input size; "
            "another input size needs another export.",
            "- **Speed** depends on hardware, dtype and batch size; the FLOP ceiling is an upper bound, not a "
            "measurement.",
        ]
    )


def generate_model_card(model: CroprViTPreTrainedModel, measurements: Measurements, default_name: str) -> str:
    """Render the README.md of a CroprViT checkpoint.

    Args:
        model: the checkpoint's task model (classification or segmentation).
        measurements: validated measurements (`load_measurements` / `parse_measurements`).
        default_name: title and usage repo id when `measurements.repo_id` is not given (e.g. the folder name).
    """
    pipeline_tag, task_name = task_of(model)
    repo_id = measurements.repo_id or default_name
    title = repo_id.split("/")[-1]
    return Template(CARD_TEMPLATE).substitute(
        front_matter=_front_matter(measurements, pipeline_tag, title),
        title=title,
        paper_url=PAPER_URL,
        task_name=task_name,
        dataset_name=measurements.dataset.name,
        base_name=measurements.base_model.name,
        base_id=measurements.base_model.id,
        details=_details(model, measurements, task_name),
        schedule=_schedule(model.config),
        speed=_speed(measurements),
        evaluation=_evaluation(measurements),
        usage=_usage(repo_id, pipeline_tag),
        limitations=_limitations(model.config),
        citation=CITATION,
    )


def write_model_card(
    model: CroprViTPreTrainedModel, measurements: Measurements, path: str | Path, default_name: str
) -> Path:
    """`generate_model_card` written to `path` (UTF-8)."""
    path = Path(path)
    path.write_text(generate_model_card(model, measurements, default_name), encoding="utf-8")
    return path


__all__ = [
    "CARD_TEMPLATE",
    "CITATION",
    "Measurements",
    "MeasurementsError",
    "NOT_MEASURED",
    "SCHEMA_VERSION",
    "generate_model_card",
    "load_measurements",
    "parameter_counts",
    "parse_measurements",
    "write_model_card",
]
