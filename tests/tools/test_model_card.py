"""Model cards: Hub-valid metadata, only the numbers that were given or computed, clear errors for missing fields."""

import copy
import json
import re

import pytest
import yaml
from conftest import REPO_ROOT, tiny_config_kwargs
from huggingface_hub import ModelCard

from cropr import CroprViTConfig, CroprViTForImageClassification, CroprViTForSemanticSegmentation, CroprViTModel
from cropr.tools.model_card import (
    CARD_TEMPLATE,
    NOT_MEASURED,
    MeasurementsError,
    generate_model_card,
    load_measurements,
    parameter_counts,
    parse_measurements,
)

MINIMAL = {
    "schema_version": 1,
    "base_model": {"id": "google/vit-base-patch16-224", "license": "apache-2.0"},
    "dataset": {"id": "imagenet-1k"},
}
# Distinctive values, so that finding them in the card means they came from here.
FULL = {
    **MINIMAL,
    "repo_id": "someone/cropr-tiny",
    "license": "mit",
    "base_model": {"id": "google/vit-base-patch16-224", "license": "apache-2.0", "name": "ViT-B/16"},
    "dataset": {"id": "imagenet-1k", "name": "ImageNet-1k", "split": "validation"},
    "speed": [
        {
            "speedup": 1.737,
            "hardware": "NVIDIA A100-SXM4-80GB",
            "dtype": "float16",
            "batch_size": 192,
            "torch_version": "2.5.1",
            "throughput": 2345.6,
        }
    ],
    "metrics": [{"type": "accuracy", "name": "Top-1 accuracy (%)", "value": 81.234, "baseline": 81.876}],
}
GIVEN_NUMBERS = {"1.737", "192", "2.5.1", "2345.6", "81.234", "81.876", "100", "80"}  # the last two: "A100-...-80GB"
NUMBER = re.compile(r"\d+(?:\.\d+)*")


@pytest.fixture(scope="module")
def classifier():
    return CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs()))


def split_card(card: str) -> tuple[dict, str]:
    _, front_matter, body = card.split("---\n", 2)
    return yaml.safe_load(front_matter), body


def test_front_matter_is_valid_hub_metadata(classifier):
    card = generate_model_card(classifier, parse_measurements(FULL), "unused")
    metadata, _ = split_card(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert {"token-pruning", "cropr", "vision"} <= set(metadata["tags"])
    assert metadata["license"] == "mit"
    assert metadata["datasets"] == ["imagenet-1k"]
    assert metadata["metrics"] == ["accuracy"]
    assert metadata["base_model"] == "google/vit-base-patch16-224"
    data = ModelCard(card).data  # huggingface_hub parses and validates model-index
    assert data.eval_results[0].metric_value == 81.234
    assert data.eval_results[0].dataset_split == "validation"


def test_given_numbers_appear(classifier):
    _, body = split_card(generate_model_card(classifier, parse_measurements(FULL), "unused"))
    for text in ("1.737x", "| 192 |", "2.5.1", "2345.6", "| 81.234 | 81.876 |", "NVIDIA A100-SXM4-80GB", "float16"):
        assert text in body
    assert "images/s (unpruned) | notes |" in body and f"| {NOT_MEASURED} |" in body  # baseline throughput absent
    assert 'from_pretrained("someone/cropr-tiny")' in body


def test_no_number_that_was_not_given(classifier):
    minimal = generate_model_card(classifier, parse_measurements(MINIMAL), "cropr-tiny")
    full = generate_model_card(classifier, parse_measurements(FULL), "cropr-tiny")
    _, minimal_body = split_card(minimal)
    assert f"Speed: {NOT_MEASURED}." in minimal_body
    assert f"Evaluation: {NOT_MEASURED}." in minimal_body
    assert "x |" not in minimal_body.split("## Speed")[1].split("## Usage")[0]
    # The measurements add exactly their own numbers to the card ...
    assert set(NUMBER.findall(full)) - set(NUMBER.findall(minimal)) == GIVEN_NUMBERS
    # ... and every decimal the minimal card holds is computed from the model (or is the arXiv id or a given name):
    # the tiny preset's 729,344 and 620,416 multiply-adds (see test_benchmark.py), their ratio, and the parameters.
    full_params = sum(p.numel() for p in classifier.parameters())
    stripped = sum(p.numel() for p in copy.deepcopy(classifier).strip_training_modules().parameters())
    computed = {
        "0.0007293",
        "0.0006204",
        "1.18",
        f"{full_params / 1e6:.2f}",
        f"{stripped / 1e6:.2f}",
        "2412.00965",
        "2.0",  # the given license, "apache-2.0"
    }
    assert {number for number in NUMBER.findall(minimal) if "." in number} <= computed


def test_parameters_full_and_stripped(classifier):
    full, stripped = parameter_counts(classifier)
    assert full == sum(p.numel() for p in classifier.parameters())
    assert stripped == sum(p.numel() for p in copy.deepcopy(classifier).strip_training_modules().parameters())
    assert stripped < full
    stripped_model = copy.deepcopy(classifier).strip_training_modules()
    assert parameter_counts(stripped_model) == (full, stripped)
    _, body = split_card(generate_model_card(classifier, parse_measurements(MINIMAL), "x"))
    assert f"({full:,})" in body and f"({stripped:,})" in body
    assert "17 → 13 → 10 → 17" in body  # tokens per block of the tiny preset


def test_segmentation_card():
    model = CroprViTForSemanticSegmentation(CroprViTConfig(**tiny_config_kwargs(num_queries=16)))
    card = generate_model_card(model, parse_measurements(MINIMAL), "seg")
    metadata, body = split_card(card)
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert metadata["license"] == "apache-2.0"  # the base model's, when none is given
    assert "AutoModelForSemanticSegmentation" in body and 'pipeline("image-segmentation"' in body


def test_backbone_without_head_is_refused():
    with pytest.raises(ValueError, match="classification or segmentation"):
        generate_model_card(CroprViTModel(CroprViTConfig(**tiny_config_kwargs())), parse_measurements(MINIMAL), "x")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["base_model"].pop("license"), r"`base_model\.license` is required \(the license of the base"),
        (lambda m: m.pop("base_model"), "`base_model` is required"),
        (lambda m: m["dataset"].pop("id"), r"`dataset\.id` is required"),
        (lambda m: m.pop("schema_version"), "`schema_version` is required"),
        (lambda m: m.update(schema_version=2), "not supported"),
        (lambda m: m["speed"][0].pop("hardware"), r"`speed\[0\]\.hardware` is required"),
        (lambda m: m["speed"][0].update(speedup="fast"), r"`speed\[0\]\.speedup` must be a number"),
        (lambda m: m["speed"][0].update(batch_size=True), "must be an integer"),
        (lambda m: m["metrics"][0].pop("value"), r"`metrics\[0\]\.value` is required"),
        (lambda m: m.update(speedup=2.0), r"unknown key\(s\) \['speedup'\]"),
        (lambda m: m.update(metrics={"accuracy": 1}), "must be a list"),
    ],
)
def test_missing_or_bad_fields_are_refused(change, message):
    measurements = copy.deepcopy(FULL)
    change(measurements)
    with pytest.raises(MeasurementsError, match=message):
        parse_measurements(measurements)


def test_load_measurements(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(FULL))
    assert load_measurements(path).speed[0].speedup == 1.737
    path.write_text("{not json")
    with pytest.raises(MeasurementsError, match="not valid JSON"):
        load_measurements(path)


def test_template_copy_is_in_sync():
    assert (REPO_ROOT / "model_cards" / "template.md").read_text(encoding="utf-8") == CARD_TEMPLATE
