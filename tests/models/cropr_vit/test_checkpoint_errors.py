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


def unknown_key_warnings(records) -> list[str]:
    return [str(record.message) for record in records if "is not a CroprViTConfig field" in str(record.message)]


def test_saved_checkpoints_and_standard_keyword_arguments_load_without_unknown_key_warnings(tmp_path, recwarn):
    """transformers passes and writes many standard keys (id2label, problem_type, architectures, dtype, auto_map,
    transformers_version, ...): none of them is taken for a misspelled field."""
    from transformers import AutoConfig, AutoModel

    from cropr import CroprViTForMultiLabelClassification

    classifier = CroprViTForImageClassification(
        CroprViTConfig(**tiny_config_kwargs(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}))
    )
    classifier(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))  # records problem_type
    classifier.config.use_cache = False  # what `Trainer` writes onto the config of every model it trains
    classifier.save_pretrained(tmp_path / "classifier")
    CroprViTForMultiLabelClassification(CroprViTConfig(**tiny_config_kwargs())).save_pretrained(tmp_path / "multi")
    segmenter = CroprViTForSemanticSegmentation(CroprViTConfig(**tiny_config_kwargs(num_queries=16)))
    segmenter.to(torch.bfloat16).strip_training_modules().save_pretrained(tmp_path / "segmenter")
    for name in ("classifier", "multi", "segmenter"):
        folder = tmp_path / name
        CroprViTConfig(**json.loads((folder / "config.json").read_text()))
        AutoConfig.from_pretrained(folder, num_labels=3, output_attentions=True, attn_implementation="eager")
        AutoModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    CroprViTForImageClassification.from_pretrained(
        tmp_path / "classifier", num_labels=4, ignore_mismatched_sizes=True, problem_type="single_label_classification"
    )
    assert unknown_key_warnings(recwarn) == []


@pytest.fixture(scope="module")
def stripped(tmp_path_factory) -> tuple[Path, Path]:
    """A trained-looking model saved in full and after `strip_training_modules()` (routers after blocks 0 and 1)."""
    folder = tmp_path_factory.mktemp("stripped")
    torch.manual_seed(0)
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs())).eval()
    model.save_pretrained(folder / "full")
    model.strip_training_modules().save_pretrained(folder / "stripped")
    return folder / "full", folder / "stripped"


@pytest.mark.parametrize(
    ("overrides", "untrained", "alternative"),
    [
        ({"last_layer_fusion": False}, [2], r"prunes only after blocks \[0, 1\]"),
        ({"pruning_schedule": [2, 2, 2, 0], "last_layer_fusion": False}, [2], r"prunes only after blocks \[0, 1\]"),
        ({"token_selector": "none"}, None, None),
        ({"pruning_schedule": [3, 0, 0, 0]}, None, None),
    ],
)
def test_stripped_checkpoint_cannot_gain_an_untrained_router(stripped, overrides, untrained, alternative):
    """Before: the new router's aggregated query was uninitialised memory (1e34, inf, different on every load)."""
    if untrained is not None:
        message = rf"routers after blocks {re.escape(str(untrained))}.*Load the full training checkpoint.*{alternative}"
        with pytest.raises(ValueError, match=message):
            CroprViTForImageClassification.from_pretrained(stripped[1], **overrides)
        return
    x = torch.randn(2, 3, 32, 32)
    first, second = (CroprViTForImageClassification.from_pretrained(stripped[1], **overrides) for _ in range(2))
    assert torch.equal(first(x).logits, second(x).logits)
    assert all(torch.isfinite(buffer).all() for buffer in first.buffers())


def test_full_checkpoint_can_gain_a_trainable_router(stripped):
    model = CroprViTForImageClassification.from_pretrained(stripped[0], last_layer_fusion=False)
    router = model.cropr_vit.token_selector.routers["2"]
    assert router.queries is not None and torch.isfinite(router.aggregated_query).all()
    assert torch.allclose(router.aggregated_query, router.queries.sum(0))


def test_stripped_model_cannot_switch_to_a_learned_selector_without_routers():
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs(token_selector="variance")))
    model.strip_training_modules()
    with pytest.raises(ValueError, match=r"routers after blocks \[0, 1\].*selector without routers"):
        model.with_token_selector("cropr")


def test_unloaded_stripped_router_is_initialised_to_zeros():
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs(inference_only=True)))
    router = model.cropr_vit.token_selector.routers["0"]
    router.aggregated_query.fill_(float("nan"))
    model._init_weights(router)
    assert torch.equal(router.aggregated_query, torch.zeros_like(router.aggregated_query))


def test_checkpoint_saved_in_training_mode_loads_inference_only_with_current_routing(tmp_path):
    """The aggregated queries are refreshed only on `eval()`; saving refreshes them, so that the saved buffer matches
    the saved queries and the checkpoint also loads with `inference_only=True`."""
    torch.manual_seed(0)
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs())).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    for _ in range(3):
        model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)  # still in training mode, as Trainer saves checkpoints
    stripped_model = CroprViTForImageClassification.from_pretrained(tmp_path, inference_only=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = model.eval()(x, output_kept_indices=True)
    output = stripped_model(x, output_kept_indices=True)
    for indices, expected_indices in zip(output.kept_indices, expected.kept_indices, strict=True):
        assert torch.equal(indices, expected_indices)
