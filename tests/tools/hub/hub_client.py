"""Client side of the Hub tests, run as a separate process per scenario against the local Hub.

`HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE=0` must be in the environment before this starts (they are
read when huggingface_hub is imported). Usage: `python hub_client.py {push,pull,remote-code} WORK_DIR`. Each
scenario writes what the test compares (logits, scores, commit SHAs) as `WORK_DIR/<scenario>.pt`; checks that need
the process's own state are asserted here, and a failure exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path

CLASSIFIER_REPO = "org/cropr-tiny"
INFERENCE_REPO = "org/cropr-tiny-inference"
TRAINING_REPO = "org/cropr-tiny-training"
TRAINER_REPO = "org/cropr-trainer"
SCRIPT_REPO = "org/cropr-script"
FASHION_LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


class _BlockCropr(importlib.abc.MetaPathFinder):
    """Makes `import cropr` fail, as on a machine where the package is not installed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "cropr" or fullname.startswith("cropr."):
            raise ImportError(f"{fullname} is blocked: this process stands for a machine without cropr")
        return None


def _tests_conftest():
    """The tests' top-level conftest.py (loaded by path: this folder has its own)."""
    spec = importlib.util.spec_from_file_location(
        "cropr_tests_conftest", Path(__file__).resolve().parents[2] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_config_kwargs(**overrides) -> dict:
    return _tests_conftest().tiny_config_kwargs(**overrides)


def _test_images():
    """A real photo and two Fashion-MNIST-like RGB arrays (the same in every process)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    garments = [np.repeat(rng.integers(0, 255, size=(28, 28, 1), dtype=np.uint8), 3, axis=2) for _ in range(2)]
    return [Image.fromarray(data.chelsea()), *garments]


def _logits(model, processor, images):
    import torch

    with torch.no_grad():
        return model.eval()(**processor(images=images, return_tensors="pt")).logits


class _WarningRecorder(logging.Handler):
    """Keeps WARNING-or-above records of the `transformers` logger (which does not propagate)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("transformers").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()[:300]}")


def push(work_dir: Path) -> dict:
    """Push a tiny classifier four ways: `push_to_hub`, `push_inference_checkpoint` (stripped and full), Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments, ViTImageProcessorPil

    from cropr import CroprViTConfig, CroprViTForImageClassification
    from cropr.tools.hub import push_inference_checkpoint

    torch.manual_seed(0)
    config = CroprViTConfig(**_tiny_config_kwargs(num_labels=10, id2label=dict(enumerate(FASHION_LABELS))))
    model = CroprViTForImageClassification(config)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    images = _test_images()

    model.push_to_hub(CLASSIFIER_REPO)
    processor.push_to_hub(CLASSIFIER_REPO)
    stripped_commit = push_inference_checkpoint(model, INFERENCE_REPO, processor)
    push_inference_checkpoint(model, TRAINING_REPO, processor, include_training_parameters=True)
    router = next(iter(model.cropr_vit.token_selector.routers.values()))
    assert router.queries is not None and not model.config.inference_only, "push_inference_checkpoint mutated model"

    torch.manual_seed(1)
    trainee = CroprViTForImageClassification(CroprViTConfig(**_tiny_config_kwargs(num_labels=10)))
    samples = [{"pixel_values": torch.randn(3, 32, 32), "labels": torch.tensor(i % 10)} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(work_dir / "trainer"),
        push_to_hub=True,
        hub_model_id=TRAINER_REPO,
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=trainee, args=args, train_dataset=samples, processing_class=processor)
    trainer.train()
    trainer_commit = trainer.push_to_hub()
    return {
        "logits": _logits(model, processor, images),
        "trainer_logits": _logits(trainer.model, processor, images),
        "stripped_commit": stripped_commit.oid,
        "trainer_commit": trainer_commit.oid,
    }


def pull(work_dir: Path) -> dict:
    """Load every pushed repo by its Hub id, with the cropr package installed."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    import cropr  # noqa: F401  (registers cropr_vit with the Auto classes)

    reference = torch.load(work_dir / "push.pt")
    recorder = _WarningRecorder()
    images = _test_images()
    processor = AutoImageProcessor.from_pretrained(CLASSIFIER_REPO)
    result = {"processor": type(processor).__name__}
    for name, repo, revision in (
        ("pushed", CLASSIFIER_REPO, None),
        ("stripped", INFERENCE_REPO, reference["stripped_commit"]),
        ("training", TRAINING_REPO, None),
        ("trainer", TRAINER_REPO, None),
    ):
        model = AutoModelForImageClassification.from_pretrained(repo, revision=revision)
        result[f"{name}_logits"] = _logits(model, processor, images)
        result[f"{name}_inference_only"] = model.config.inference_only
    classify = pipeline("image-classification", model=CLASSIFIER_REPO)
    result["pipeline_scores"] = classify(images[0], top_k=10)
    result["trainer_pipeline_scores"] = pipeline("image-classification", model=TRAINER_REPO)(images[0], top_k=10)
    result["warnings"] = recorder.messages
    return result


def remote_code(work_dir: Path) -> dict:
    """Load the pushed classifier with `trust_remote_code=True` where `cropr` cannot be imported."""
    sys.meta_path.insert(0, _BlockCropr())
    try:
        import cropr  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("`import cropr` must fail in the remote-code scenario")

    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    images = _test_images()
    processor = AutoImageProcessor.from_pretrained(CLASSIFIER_REPO)
    model = AutoModelForImageClassification.from_pretrained(CLASSIFIER_REPO, trust_remote_code=True)
    classify = pipeline("image-classification", model=CLASSIFIER_REPO, trust_remote_code=True)
    return {
        "model_module": type(model).__module__,
        "logits": _logits(model, processor, images),
        "pipeline_scores": classify(images[0], top_k=10),
        "cropr_modules": sorted(name for name in sys.modules if name == "cropr" or name.startswith("cropr.")),
    }


def script_push(work_dir: Path) -> dict:
    """Run the image-classification training script with `--push_to_hub`, as a user would."""
    from cropr.training.run import run

    output_dir = work_dir / "script"
    argv = [*_tests_conftest().TINY_RUN, "--output_dir", str(output_dir), "--push_to_hub", "true"]
    results = run("image-classification", [*argv, "--hub_model_id", SCRIPT_REPO])
    return {"output_dir": results["output_dir"]}


SCENARIOS = {"push": push, "pull": pull, "remote-code": remote_code, "script-push": script_push}


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in SCENARIOS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(SCENARIOS)}}} WORK_DIR")
    scenario, work_dir = sys.argv[1], Path(sys.argv[2])
    result = SCENARIOS[scenario](work_dir)
    import torch

    torch.save(result, work_dir / f"{scenario}.pt")


if __name__ == "__main__":
    main()
