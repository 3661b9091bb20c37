"""Broken checkpoint folders fail with an error that names the file and the problem; weights load from safetensors only.

transformers 5.23 on its own would (a) raise safetensors' bare `SafetensorError` ("Error while deserializing header:
...", no file name) for a truncated or overwritten `model.safetensors`, and (b) fall back to unpickling a lone
`pytorch_model.bin` with `torch.load(weights_only=True)`. `CroprViTPreTrainedModel.from_pretrained` turns (a) into an
`OSError` naming the file and refuses (b) (`use_safetensors=True` by default).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config_kwargs
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForImageClassification

from cropr import CroprViTConfig, CroprViTForImageClassification, CroprViTForSemanticSegmentation


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, CroprViTForImageClassification]:
    folder = tmp_path_factory.mktemp("checkpoint") / "good"
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs())).eval()
    model.save_pretrained(folder)
    return folder, model


def copy_of(saved_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved_folder, folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_weights_file_names_it(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no file named model\.safetensors .*" + re.escape(str(folder))):
        CroprViTForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"not a safetensors file" * 4, id="garbage"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_weights_file_is_an_os_error_naming_it(saved, tmp_path, corrupt):
    folder = copy_of(saved[0], tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(OSError, match=re.escape(str(weights)) + ".*truncated or not a safetensors file"):
        CroprViTForImageClassification.from_pretrained(folder)
    with pytest.raises(OSError, match=re.escape(str(weights))):  # the Auto classes go through the same method
        AutoModelForImageClassification.from_pretrained(folder)


def test_sharded_checkpoint_names_the_broken_or_missing_shard(saved, tmp_path):
    saved[1].save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    with pytest.raises(OSError, match=re.escape(str(shards[1])) + ".*truncated or not a safetensors file"):
        CroprViTForImageClassification.from_pretrained(tmp_path)
    shards[1].unlink()
    with pytest.raises(OSError, match=re.escape(str(shards[1]))):
        CroprViTForImageClassification.from_pretrained(tmp_path)


def test_config_of_another_model_type_is_refused(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    edit_config(folder, model_type="vit")
    with pytest.raises(ValueError, match="'vit' config, not a 'cropr_vit' one.*from_backbone"):
        CroprViTForImageClassification.from_pretrained(folder)


def test_hand_edited_schedule_that_does_not_fit_names_the_numbers(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    edit_config(folder, pruning_rate=30)
    with pytest.raises(ValueError, match=r"removes 61 tokens \(\[31, 30, 0, 0\]\).*16 patch tokens"):
        CroprViTForImageClassification.from_pretrained(folder)
    edit_config(folder, pruning_rate=3, pruning_schedule=[4, 4])
    with pytest.raises(ValueError, match=r"one entry per block \(4\), got 2"):
        CroprViTForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pruning_rate": 2.5}, r"'pruning_rate' expected int, got float \(value: 2.5\)"),
        ({"pruning_schedule": [4, "x", 0, 0]}, r"'pruning_schedule' with value \[4, 'x', 0, 0\]"),
        ({"image_size": "32"}, r"'image_size' with value '32'"),
        ({"last_layer_fusion": "yes"}, r"'last_layer_fusion' expected bool, got str"),
        ({"num_hidden_layers": None}, r"'num_hidden_layers' expected int, got NoneType"),
        ({"image_size": [32, 32, 3]}, r"`image_size` must be an int or a \(height, width\) pair, got \[32, 32, 3\]"),
        ({"token_selector": "Cropr"}, r"`token_selector` must be one of .* got 'Cropr'"),
    ],
)
def test_hand_edited_config_values_of_the_wrong_type_are_named(saved, tmp_path, changes, message):
    """Field types are checked (huggingface_hub `@strict`), not only values: nothing half-works with a bad type."""
    folder = copy_of(saved[0], tmp_path)
    edit_config(folder, **changes)
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        CroprViTForImageClassification.from_pretrained(folder)


def test_cli_reports_a_config_field_of_the_wrong_type_in_one_line(saved, tmp_path, capsys):
    from cropr.cli import main

    folder = copy_of(saved[0], tmp_path)
    edit_config(folder, pruning_rate=2.5)
    capsys.readouterr()
    assert main(["info", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cropr: error: ") and err.count("\n") == 1 and "'pruning_rate' expected int" in err, err


def test_unreadable_config_json_names_the_file(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(OSError, match=re.escape(str(folder / "config.json")) + ".*not a valid JSON"):
        CroprViTForImageClassification.from_pretrained(folder)


def test_a_lone_pytorch_model_bin_is_never_unpickled(saved, tmp_path, monkeypatch):
    folder = copy_of(saved[0], tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(saved[1].state_dict(), folder / "pytorch_model.bin")

    def fail(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(OSError, match=r"no file named model\.safetensors found"):
        CroprViTForImageClassification.from_pretrained(folder)
    with pytest.raises(OSError, match=r"no file named model\.safetensors found"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_explicit_opt_out_still_reads_a_bin_file(saved, tmp_path):
    """`use_safetensors=False` given by the caller is respected (transformers loads with `weights_only=True`)."""
    folder = copy_of(saved[0], tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(saved[1].state_dict(), folder / "pytorch_model.bin")
    loaded = CroprViTForImageClassification.from_pretrained(folder, use_safetensors=False).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x).logits, saved[1](x).logits)


def test_weights_of_another_shape_fail_loudly(tmp_path):
    """A config edited to another width than its weights: transformers' size-mismatch error, never silent reinit."""
    model = CroprViTForSemanticSegmentation(CroprViTConfig(**tiny_config_kwargs(hidden_size=64, num_queries=16)))
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, hidden_size=32)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        CroprViTForSemanticSegmentation.from_pretrained(tmp_path)


def test_package_source_has_no_pickle_path():
    """No `torch.load` / `pickle` anywhere in the package or scripts: weights come from safetensors only."""
    pattern = re.compile(r"\btorch\.load\b|\bpickle\b|\bweights_only\b")
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for folder in ("src", "scripts")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
