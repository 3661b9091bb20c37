"""Checkpoints saved by earlier versions of the package load and compute what they computed then.

The fixture was saved by cropr 0.1.0, before the model family moved into `models/cropr_vit/`. It is loaded with the
installed package, and, in a process where `import cropr` fails, with the code the checkpoint carries; that process
also strips it with that code, so a stripped checkpoint of the old version is loaded with the package too.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

import cropr  # noqa: F401  (registers the model family with the Auto classes)
from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.models.cropr_vit.modeling_cropr_vit import CHECKPOINT_CONVERSION

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "cropr_vit_0.1.0"
EXPECTED = load_file(FIXTURE / "expected.safetensors")

REMOTE_CODE_SCRIPT = """
import json, sys
sys.modules["cropr"] = None  # a machine without the package: only the checkpoint's own code can load it
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
expected = load_file(sys.argv[2])
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(expected["pixel_values"]).logits
model.strip_training_modules().save_pretrained(sys.argv[3])
print(json.dumps({"module": type(model).__module__, "max_diff": (logits - expected["logits"]).abs().max().item()}))
"""


def logits_of(model: CroprViTForImageClassification) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(EXPECTED["pixel_values"]).logits


def test_checkpoint_of_the_previous_layout_loads_with_the_package():
    for model in (
        CroprViTForImageClassification.from_pretrained(FIXTURE / "full"),
        AutoModelForImageClassification.from_pretrained(FIXTURE / "full"),
    ):
        assert isinstance(model, CroprViTForImageClassification)
        torch.testing.assert_close(logits_of(model), EXPECTED["logits"], rtol=0, atol=1e-6)


def test_checkpoint_of_the_previous_layout_loads_with_its_own_code_and_strips(tmp_path):
    stripped = tmp_path / "stripped"
    arguments = [str(FIXTURE / "full"), str(FIXTURE / "expected.safetensors"), str(stripped)]
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")  # the checkpoint's code, not the package
    assert report["max_diff"] <= 1e-6
    model = CroprViTForImageClassification.from_pretrained(stripped)
    assert model.config.inference_only
    torch.testing.assert_close(logits_of(model), EXPECTED["logits"], rtol=0, atol=1e-6)


def test_checkpoints_keep_the_query_key_and_value_projections_the_model_runs_as_one(tmp_path):
    original = load_file(FIXTURE / "full" / "model.safetensors")
    model = CroprViTForImageClassification.from_pretrained(FIXTURE / "full")
    for block, layer in enumerate(model.cropr_vit.layers):
        prefix = f"cropr_vit.layers.{block}.attention."
        for kind in ("weight", "bias"):
            three = torch.cat([original[f"{prefix}{projection}_proj.{kind}"] for projection in "qkv"])
            assert torch.equal(getattr(layer.attention.qkv_proj, kind), three)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    projections = {name for name in original if ".attention." in name}
    assert projections == {name for name in saved if ".attention." in name}
    assert all(torch.equal(saved[name], original[name]) for name in projections)


def test_torch_load_state_dict_of_the_saved_files_fills_the_fused_projection(tmp_path):
    """The Trainer resumes a run with torch's `load_state_dict` of the saved files, which bypasses transformers'
    conversion: the three projections still land in `qkv_proj`, and a file missing one of them is refused."""
    model = CroprViTForImageClassification.from_pretrained(FIXTURE / "full")
    saved = load_file(FIXTURE / "full" / "model.safetensors")
    fresh = CroprViTForImageClassification(model.config)
    fresh.load_state_dict(saved, strict=True)
    torch.testing.assert_close(logits_of(fresh), EXPECTED["logits"], rtol=0, atol=1e-6)

    del saved["cropr_vit.layers.1.attention.v_proj.weight"]
    with pytest.raises(RuntimeError, match=r"layers\.1\.attention\.qkv_proj\.weight"):
        fresh.load_state_dict(saved, strict=True)


def test_projections_a_transformers_left_unfused_are_refused_not_left_random():
    """Without the registered conversion the three projections would be unexpected keys and `qkv_proj` would keep
    its random initialisation: loading says so instead."""
    register_checkpoint_conversion_mapping(CroprViTConfig.model_type, [], overwrite=True)
    try:
        with pytest.raises(RuntimeError, match=r"were not fused into `qkv_proj`"):
            CroprViTForImageClassification.from_pretrained(FIXTURE / "full")
    finally:
        register_checkpoint_conversion_mapping(CroprViTConfig.model_type, CHECKPOINT_CONVERSION, overwrite=True)
    CroprViTForImageClassification.from_pretrained(FIXTURE / "full")
