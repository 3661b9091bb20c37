"""Push to and pull from a Hub over real HTTP (the local Hub of `local_hub.py`), in separate client processes.

One `push` process pushes a tiny classifier with `push_to_hub` (model + image processor), with
`cropr.tools.hub.push_inference_checkpoint` (stripped and with training parameters) and through
`Trainer(push_to_hub=True)`;
a `pull` process loads every repo by id with cropr installed, and a `remote-code` process loads it with
`trust_remote_code=True` where `import cropr` fails; a `script-push` process runs a training script with
`--push_to_hub`. The tests compare what each process saw.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.tools.hub import push_inference_checkpoint

from .hub_client import CLASSIFIER_REPO, FASHION_LABELS, INFERENCE_REPO, SCRIPT_REPO, TRAINER_REPO, TRAINING_REPO
from .local_hub import LocalHub

SHA = re.compile(r"[0-9a-f]{40}")
TRAINING_ONLY = re.compile(r"\.(queries|aggregator|aux_head)\b")


@pytest.fixture(scope="module")
def pushed(run_client) -> dict:
    return run_client("push")


@pytest.fixture(scope="module")
def pulled(pushed, run_client) -> dict:
    return run_client("pull")


@pytest.fixture(scope="module")
def remote(pushed, run_client) -> dict:
    return run_client("remote-code", isolated=True)


def weight_names(hub: LocalHub, repo_id: str) -> set[str]:
    return set(load_safetensors(hub.file(repo_id, "model.safetensors")))


def assert_softmax_scores(results: list[dict], logits: torch.Tensor) -> None:
    expected = torch.softmax(logits, dim=-1)
    scores = {result["label"]: result["score"] for result in results}
    torch.testing.assert_close(torch.tensor([scores[label] for label in FASHION_LABELS]), expected)


def test_push_to_hub_then_from_pretrained_and_pipeline_give_identical_logits(pushed, pulled):
    assert torch.equal(pulled["pushed_logits"], pushed["logits"])
    assert pulled["processor"] == "ViTImageProcessorPil"
    assert_softmax_scores(pulled["pipeline_scores"], pushed["logits"][0])
    assert pulled["warnings"] == []


def test_pushed_repo_carries_weights_processor_code_and_auto_map(local_hub, pushed):
    files = local_hub.files(CLASSIFIER_REPO)
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    expected |= {"configuration_cropr_vit.py", "modeling_cropr_vit.py", "routing_cropr_vit.py"}
    assert expected <= files.keys()
    config = json.loads(files["config.json"])
    assert config["model_type"] == "cropr_vit"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_cropr_vit.CroprViTForImageClassification"
    assert json.loads(files["preprocessor_config.json"])["image_processor_type"] == "ViTImageProcessor"
    assert len(local_hub.commit_messages(CLASSIFIER_REPO)) == 3  # repo creation, model, image processor
    assert all(SHA.fullmatch(sha) for sha in local_hub.repos[CLASSIFIER_REPO].commits)


def test_push_inference_checkpoint_pushes_stripped_weights_unless_asked(local_hub, pushed, pulled):
    stripped, full = weight_names(local_hub, INFERENCE_REPO), weight_names(local_hub, TRAINING_REPO)
    assert not any(TRAINING_ONLY.search(name) for name in stripped)
    assert any(TRAINING_ONLY.search(name) for name in full)
    assert stripped < full and full - stripped == {name for name in full if TRAINING_ONLY.search(name)}
    assert weight_names(local_hub, CLASSIFIER_REPO) == full  # plain push_to_hub keeps everything
    for repo in (INFERENCE_REPO, TRAINING_REPO):
        assert "preprocessor_config.json" in local_hub.files(repo)  # one commit with the processor
        assert len(local_hub.commit_messages(repo)) == 2
    assert json.loads(local_hub.file(INFERENCE_REPO, "config.json"))["inference_only"] is True
    assert json.loads(local_hub.file(TRAINING_REPO, "config.json"))["inference_only"] is False

    assert pulled["stripped_inference_only"] is True and pulled["training_inference_only"] is False
    assert torch.equal(pulled["stripped_logits"], pushed["logits"])  # loaded by commit SHA
    assert torch.equal(pulled["training_logits"], pushed["logits"])


def test_trainer_push_to_hub_uploads_a_loadable_checkpoint(local_hub, pushed, pulled):
    files = local_hub.files(TRAINER_REPO)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "training_args.bin"} <= files.keys()
    assert not any(path.startswith("checkpoint-") for path in files)
    assert local_hub.commit_messages(TRAINER_REPO)[-1] == "End of training"
    assert local_hub.repos[TRAINER_REPO].branches["main"] == pushed["trainer_commit"]
    assert torch.equal(pulled["trainer_logits"], pushed["trainer_logits"])
    assert len(pulled["trainer_pipeline_scores"]) == 10


def test_training_script_push_to_hub_uploads_the_stripped_checkpoint(local_hub, run_client):
    output_dir = Path(run_client("script-push")["output_dir"])
    files = local_hub.files(SCRIPT_REPO)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files.keys()
    # What the script saved locally, byte for byte: the stripped weights and the image processor.
    for name in ("model.safetensors", "preprocessor_config.json"):
        assert files[name] == (output_dir / name).read_bytes(), name
    assert json.loads(files["config.json"])["inference_only"] is True
    assert not any(TRAINING_ONLY.search(name) for name in weight_names(local_hub, SCRIPT_REPO))


def test_trust_remote_code_round_trip_without_cropr(pushed, remote):
    assert remote["cropr_modules"] == []
    assert remote["model_module"].startswith("transformers_modules.")
    assert torch.equal(remote["logits"], pushed["logits"])
    assert_softmax_scores(remote["pipeline_scores"], pushed["logits"][0])


def test_resolve_answers_headers_and_error_codes_like_the_hub(local_hub, pushed):
    commit = local_hub.repos[CLASSIFIER_REPO].branches["main"]
    content = local_hub.file(CLASSIFIER_REPO, "config.json")
    request = urllib.request.Request(f"{local_hub.url}/{CLASSIFIER_REPO}/resolve/main/config.json", method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["X-Repo-Commit"] == commit
        assert int(response.headers["Content-Length"]) == len(content)
        assert SHA.fullmatch(response.headers["ETag"].strip('"'))
    for path, code in (
        (f"{CLASSIFIER_REPO}/resolve/main/missing.json", "EntryNotFound"),
        (f"{CLASSIFIER_REPO}/resolve/no-such-branch/config.json", "RevisionNotFound"),
        ("org/missing/resolve/main/config.json", "RepoNotFound"),
    ):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{local_hub.url}/{path}", timeout=10)
        assert error.value.code == 404 and error.value.headers["X-Error-Code"] == code


def test_push_inference_checkpoint_rejects_what_it_cannot_push(tiny_config):
    with pytest.raises(TypeError, match="CroprViT model"):
        push_inference_checkpoint(torch.nn.Linear(2, 2), "org/x")
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config.to_dict())).strip_training_modules()
    with pytest.raises(ValueError, match="already stripped"):
        push_inference_checkpoint(model, "org/x", include_training_parameters=True)
    with pytest.raises(TypeError, match="image processor"):
        push_inference_checkpoint(model, "org/x", image_processor=object())
