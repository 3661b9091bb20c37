"""Checkpoints saved by earlier versions of the package load and compute what they computed then.

The fixture was saved by cropr 0.1.0, before the model family moved into `models/cropr_vit/`; it is loaded with the
installed package (no remote code) and, in a process where `import cropr` fails, with the code the checkpoint carries.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import cropr  # noqa: F401  (registers the model family with the Auto classes)
from cropr import CroprViTForImageClassification

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
print(json.dumps({"module": type(model).__module__, "max_diff": (logits - expected["logits"]).abs().max().item()}))
"""


@pytest.mark.parametrize("variant", ["full", "stripped"])
def test_checkpoint_of_the_previous_layout_loads_with_the_package(variant):
    for model in (
        CroprViTForImageClassification.from_pretrained(FIXTURE / variant),
        AutoModelForImageClassification.from_pretrained(FIXTURE / variant),
    ):
        assert isinstance(model, CroprViTForImageClassification)
        with torch.no_grad():
            logits = model.eval()(EXPECTED["pixel_values"]).logits
        torch.testing.assert_close(logits, EXPECTED["logits"], rtol=0, atol=1e-6)
    assert model.config.inference_only is (variant == "stripped")


@pytest.mark.parametrize("variant", ["full", "stripped"])
def test_checkpoint_of_the_previous_layout_loads_with_its_own_code(variant, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(FIXTURE / variant), str(FIXTURE / "expected.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")  # the checkpoint's code, not the package
    assert report["max_diff"] <= 1e-6
