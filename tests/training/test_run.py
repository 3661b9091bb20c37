import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO_ROOT, TINY_RUN, build_tiny

from cropr import SUPPORTED_MODEL_TYPES, CroprViTConfig, CroprViTPreTrainedModel
from cropr.training.run import main, run
from cropr.training.tasks import TASKS, resolve_aux_ignored_labels

SCRIPTS = {
    "image-classification": "train_image_classification.py",
    "multi-label-classification": "train_multilabel.py",
    "semantic-segmentation": "train_semantic_segmentation.py",
}


def load_saved(task: str, output_dir):
    model = TASKS[task].model_class.from_pretrained(output_dir)
    assert model.config.inference_only
    assert (output_dir / "preprocessor_config.json").exists()
    return model


def record_calls(monkeypatch, owner, name: str, argument: int = 1) -> list:
    """Wrap `owner.name` so that each call's positional `argument` is appended to the returned list."""
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args[argument])
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_trains_evaluates_and_saves_a_stripped_checkpoint(tmp_path, monkeypatch, task):
    fractions = record_calls(monkeypatch, CroprViTPreTrainedModel, "set_pruning_fraction")
    clip_norms = record_calls(monkeypatch, Accelerator, "clip_grad_norm_", argument=2)
    results = run(task, TINY_RUN + ["--output_dir", str(tmp_path), "--eval_strategy", "steps", "--eval_steps", "2"])
    # Segmentation ramps R up over the first half of training by default (3 steps: 0, 1/1.5, then full); the other
    # tasks prune fully from the first step.
    if task == "semantic-segmentation":
        assert fractions == pytest.approx([0.0, 0.0, 2 / 3, 1.0, 1.0])
    else:
        assert fractions == []
    # Gradient clipping is off unless --max_grad_norm is given (Trainer still measures the norm, with max_norm=inf).
    assert clip_norms and all(norm == math.inf for norm in clip_norms)
    assert results["train"]["epoch"] > 0  # trained although --eval_strategy switched do_eval on
    main_metric = results["main_metric"]
    assert 0.0 <= results["pruned_metric"] <= 1.0 and 0.0 <= results["unpruned_metric"] <= 1.0
    assert results["eval"][f"eval_{main_metric}"] == results["pruned_metric"]
    assert set(results["throughput"]) == {"pruned", "unpruned"}
    model = load_saved(task, tmp_path)
    assert not any("queries" in name for name, _ in model.named_parameters())
    assert model(torch.randn(1, 3, 32, 32)).logits.shape[1] == len(model.config.id2label)
    # A new segmentation model's Cropr modules do not learn the built-in scenes' background class (label 0).
    assert model.config.aux_ignored_labels == ([0] if task == "semantic-segmentation" else None)


def test_pruning_arguments_reach_the_config(tmp_path, monkeypatch):
    clip_norms = record_calls(monkeypatch, Accelerator, "clip_grad_norm_", argument=2)
    argv = TINY_RUN + [
        "--output_dir", str(tmp_path),
        "--token_selector", "variance",
        "--pruning_schedule", "4,0,0,0",
        "--last_layer_fusion", "false",
        "--max_grad_norm", "0.5",
    ]  # fmt: skip
    run("image-classification", argv)
    assert [norm for norm in clip_norms if norm != math.inf] == [0.5] * 3  # clipped at every step once asked for
    config = CroprViTConfig.from_pretrained(tmp_path)
    assert config.token_selector == "variance"
    assert config.effective_pruning_schedule == [4, 0, 0, 0]
    assert not config.last_layer_fusion


def test_eval_only_run_does_not_train(tmp_path):
    run("image-classification", TINY_RUN + ["--output_dir", str(tmp_path / "trained")])
    argv = TINY_RUN + ["--output_dir", str(tmp_path / "eval"), "--do_eval"]
    results = run("image-classification", argv + ["--model_name_or_path", str(tmp_path / "trained")])
    assert results["train"] == {}


def test_fine_tuning_a_stripped_checkpoint_says_that_its_routers_do_not_learn(tmp_path, caplog):
    run("image-classification", TINY_RUN + ["--output_dir", str(tmp_path / "trained")])
    assert "inference-only checkpoint" not in caplog.text
    argv = TINY_RUN + ["--output_dir", str(tmp_path / "again"), "--model_name_or_path", str(tmp_path / "trained")]
    with caplog.at_level(logging.WARNING, logger="cropr.training.run"):
        run("image-classification", argv)
    assert "trained is an inference-only checkpoint" in caplog.text and "do not learn" in caplog.text


def test_bad_arguments_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="comma-separated integers"):
        run("image-classification", TINY_RUN + ["--output_dir", str(tmp_path), "--pruning_schedule", "4,x"])
    with pytest.raises(ValueError, match="built-in task is 'segmentation'"):
        run("semantic-segmentation", TINY_RUN + ["--output_dir", str(tmp_path), "--builtin_task", "multi-label"])
    with pytest.raises(ValueError, match="removes"):
        run("image-classification", TINY_RUN + ["--output_dir", str(tmp_path), "--pruning_rate", "30"])
    with pytest.raises(ValueError, match="not image-classification"):
        run("image-classification", TINY_RUN + ["--output_dir", str(tmp_path), "--aux_ignored_labels", "0"])
    with pytest.raises(ValueError, match="random has no Cropr modules"):
        argv = ["--output_dir", str(tmp_path), "--token_selector", "random", "--aux_ignored_labels", "0"]
        run("semantic-segmentation", TINY_RUN + argv)


def test_aux_ignored_labels_are_read_as_names_or_ids():
    labels = {0: "background", 1: "cat", 2: "sky"}
    assert resolve_aux_ignored_labels(None, labels) is None
    assert resolve_aux_ignored_labels("None", labels) == []
    assert resolve_aux_ignored_labels("background, 2", labels) == [0, 2]
    with pytest.raises(ValueError, match="'dog' is neither a class name nor a class id"):
        resolve_aux_ignored_labels("dog", labels)
    with pytest.raises(ValueError, match="'3' is neither"):
        resolve_aux_ignored_labels("3", labels)


def assert_two_ranks_trained(stdout: str) -> None:
    """32 scenes at 8 per device make 2 steps per epoch on 2 processes (4 on one): 3 steps end at epoch 1.5."""
    assert re.search(r"^\s*epoch\s*=\s*1\.5$", stdout, re.MULTILINE), stdout[-3000:]


def distributed_env(tmp_path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": str(REPO_ROOT / "src"),
    }


@pytest.mark.parametrize("task", sorted(TASKS))
def test_two_process_ddp_with_torchrun(tmp_path, task):
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_port", str(29500 + sorted(TASKS).index(task)),
        str(REPO_ROOT / "scripts" / SCRIPTS[task]),
        *TINY_RUN, "--output_dir", str(output_dir), "--ddp_backend", "gloo",
    ]  # fmt: skip
    result = subprocess.run(
        command, env=distributed_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Both ranks trained every step; only rank 0 reports and saves.
    assert_two_ranks_trained(result.stdout)
    assert result.stdout.count("Stripped inference checkpoint") == 1
    load_saved(task, output_dir)


def test_accelerate_launch_runs_the_script_unchanged(tmp_path):
    output_dir = tmp_path / "out"
    command = [
        # `accelerate launch --cpu` always starts one process; `--multi_gpu` is its multi-process launcher (torchrun's),
        # and the script's `--use_cpu` keeps both processes on the CPU, over gloo.
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29510",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "scripts" / SCRIPTS["image-classification"]),
        *TINY_RUN, "--output_dir", str(output_dir),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=distributed_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert_two_ranks_trained(result.stdout)
    assert result.stdout.count("Stripped inference checkpoint") == 1
    load_saved("image-classification", output_dir)


def save_tiny_vit(folder) -> None:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(folder)  # fmt: skip


def save_tiny_siglip(folder) -> None:
    """A SigLIP image-text checkpoint: the run converts its vision tower, whose config is nested."""
    from transformers import SiglipConfig, SiglipModel

    shape = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    SiglipModel(SiglipConfig(vision_config=dict(image_size=32, patch_size=8, **shape),
                             text_config=dict(vocab_size=99, **shape))).save_pretrained(folder)  # fmt: skip


@pytest.mark.parametrize("save_backbone", [save_tiny_vit, save_tiny_siglip], ids=["vit", "siglip"])
def test_backbone_runs_get_the_papers_pruning_regime(tmp_path, save_backbone):
    from transformers import AutoImageProcessor, DeiTImageProcessorPil

    backbone = tmp_path / "backbone"
    save_backbone(backbone)
    # A source processor that center-crops: the run keeps its normalisation but trains on whole images.
    DeiTImageProcessorPil(size={"height": 37, "width": 37}, crop_size=32, image_mean=[0.1] * 3).save_pretrained(
        backbone
    )
    argv = [arg for arg in TINY_RUN if arg not in ("--preset", "tiny")]
    run("image-classification", argv + ["--output_dir", str(tmp_path / "out"), "--backbone", str(backbone)])
    config = CroprViTConfig.from_pretrained(tmp_path / "out")
    # 16 patches, 2 modules (4 blocks with LLF): 80% of the patches, i.e. 13, set aside as evenly as possible.
    assert config.effective_pruning_schedule == [7, 6, 0, 0]
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert list(processor.image_mean) == [0.1] * 3 and not processor.do_center_crop
    assert processor.size.height == processor.size.width == config.image_size_hw[0]


def test_a_plain_vit_checkpoint_is_pointed_to_backbone_in_one_line(tmp_path):
    save_tiny_vit(tmp_path / "vit")
    argv = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "vit")]
    with pytest.raises(SystemExit) as exit_:  # what the scripts run: a message on stderr, exit status 1
        main("image-classification", [arg for arg in TINY_RUN if arg not in ("--preset", "tiny")] + argv)
    assert exit_.value.code.endswith(
        f"error: --model_name_or_path {tmp_path / 'vit'} is a 'vit' checkpoint, not a CroprViT one: to start from "
        f"{' / '.join(SUPPORTED_MODEL_TYPES)} weights, pass it as --backbone, which converts it to CroprViT"
    )
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_a_checkpoint_with_other_labels_needs_ignore_mismatched_sizes_in_one_line(tmp_path):
    build_tiny("classification", num_labels=3).save_pretrained(tmp_path / "three")
    argv = TINY_RUN + ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "three")]
    with pytest.raises(SystemExit) as exit_:
        main("image-classification", argv)
    assert exit_.value.code.endswith(
        f"error: --model_name_or_path {tmp_path / 'three'} predicts 3 labels and the data has 10: pass "
        "--ignore_mismatched_sizes to train new heads for them (the classifier and the Cropr modules' auxiliary heads)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_diverged_run_fails_and_keeps_the_previous_output(tmp_path, task):
    # What an earlier, good run left in the output folder.
    (tmp_path / "model.safetensors").write_bytes(b"earlier weights")
    (tmp_path / "preprocessor_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main(task, TINY_RUN + ["--output_dir", str(tmp_path), "--learning_rate", "1e6"])
    message = exit_.value.code  # a string: printed on stderr, exit status 1
    assert isinstance(message, str) and "\n" not in message
    assert "weight tensors hold nan or inf (cropr_vit.embeddings.cls_token, " in message
    assert "and the eval loss is nan; the final checkpoint was not saved" in message
    assert "lower --learning_rate" in message
    assert (tmp_path / "model.safetensors").read_bytes() == b"earlier weights"
    assert (tmp_path / "preprocessor_config.json").read_text() == "{}"
    assert not (tmp_path / "config.json").exists()


def test_elastic_training_draws_fractions_and_reports_the_metric_at_several_rates(tmp_path, monkeypatch):
    fractions = record_calls(monkeypatch, CroprViTPreTrainedModel, "set_pruning_fraction")
    results = run("image-classification", TINY_RUN + ["--output_dir", str(tmp_path), "--elastic_pruning", "0.5"])
    drawn = fractions[:-1]  # the last call puts the target schedule back at the end of training
    assert len(drawn) == 4 and all(0.5 <= fraction < 1.0 for fraction in drawn) and fractions[-1] == 1.0
    # The tiny preset prunes 4 (R=3, +1 for CLS) and 3 tokens; evaluated at half and three quarters of that.
    assert [entry["fraction"] for entry in results["elastic"]] == [0.5, 0.75]
    assert [entry["pruning_schedule"] for entry in results["elastic"]] == [[2, 2, 0, 0], [3, 2, 0, 0]]
    assert all(0.0 <= entry["metric"] <= 1.0 and entry["throughput"] > 0 for entry in results["elastic"])
    with pytest.raises(ValueError, match=r"--elastic_pruning is the lowest pruning fraction drawn, in \[0, 1\)"):
        run("image-classification", TINY_RUN + ["--output_dir", str(tmp_path / "bad"), "--elastic_pruning", "1"])
    with pytest.raises(ValueError, match="--elastic_pruning would be ignored"):
        argv = ["--output_dir", str(tmp_path / "bad"), "--token_selector", "none", "--elastic_pruning", "0.5"]
        run("image-classification", TINY_RUN + argv)
