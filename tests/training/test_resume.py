"""A Trainer run stopped mid-curriculum and resumed from its checkpoint equals the uninterrupted run.

The R curriculum is a pure function of `state.global_step`, so the resumed run must continue the same pruning
fractions, and with `full_determinism` (no dropout / drop-path, the generator-free Cropr selector) it must reach
the same final weights as a run of the same length that never stopped.

The training scripts as well, with their random flips, which depend on (seed, epoch, example index) only; and their
handling of the output folder: earlier checkpoints, checkpoints interrupted while saving.
"""

import logging
import os

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.training.arguments import RunError
from cropr.training.curriculum import PruningCurriculumCallback
from cropr.training.run import run
from cropr.training.tasks import TASKS, default_image_processor
from cropr.training.transforms import EpochCallback, TrainingSplit, flip_example, make_transforms

MAX_STEPS = 10
STOP_STEP = 4  # mid-epoch (6 batches per epoch) and mid-ramp (5 steps)


class RandomImages(Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": index % 5}


class FractionRecorder(TrainerCallback):
    """The pruning fraction the model trains with at each step (runs after the curriculum callback)."""

    def __init__(self):
        self.fractions: dict[int, float] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.fractions[state.global_step] = model.base_model.pruning_fraction


class StopAfterSave(TrainerCallback):
    """Emulates an interrupted job: stop right after the checkpoint of `step` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(output_dir, init_seed: int, *callbacks: TrainerCallback) -> Trainer:
    set_seed(init_seed)
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs(pruning_rate=4)))
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=MAX_STEPS,
        learning_rate=5e-3,
        warmup_steps=2,
        save_strategy="steps",
        save_steps=STOP_STEP,
        seed=0,
        full_determinism=True,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        logging_strategy="no",
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(),
        callbacks=[PruningCurriculumCallback(ramp_fraction=0.5), *callbacks],
    )


@pytest.fixture
def restore_determinism():
    """`full_determinism` changes process-wide settings (deterministic algorithms, cuDNN flags, environment
    variables): put them back for the tests that follow."""
    previous = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    environment = dict(os.environ)
    yield
    torch.use_deterministic_algorithms(previous)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    os.environ.clear()
    os.environ.update(environment)


def test_resumed_run_continues_the_curriculum_and_matches_the_uninterrupted_run(tmp_path, restore_determinism):
    uninterrupted_fractions = FractionRecorder()
    uninterrupted = make_trainer(tmp_path / "uninterrupted", 0, uninterrupted_fractions)
    uninterrupted.train()

    first_fractions = FractionRecorder()
    first = make_trainer(tmp_path / "resumed", 0, first_fractions, StopAfterSave(STOP_STEP))
    first.train()
    assert first.state.global_step == STOP_STEP
    checkpoint = tmp_path / "resumed" / f"checkpoint-{STOP_STEP}"
    assert (checkpoint / "model.safetensors").is_file()

    second_fractions = FractionRecorder()
    # Another initialisation: everything must come from the checkpoint.
    second = make_trainer(tmp_path / "resumed", 1, second_fractions)
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == MAX_STEPS

    # R ramps over the first half (5 steps): step / 5, then the full schedule.
    expected = {step: min(step / 5, 1.0) for step in range(MAX_STEPS)}
    assert uninterrupted_fractions.fractions == pytest.approx(expected)
    assert list(first_fractions.fractions) == list(range(STOP_STEP))
    assert list(second_fractions.fractions) == list(range(STOP_STEP, MAX_STEPS))
    assert {**first_fractions.fractions, **second_fractions.fractions} == uninterrupted_fractions.fractions

    # Eval mode refreshes each router's aggregated query (a buffer derived from its queries, stale in training).
    resumed_state = second.model.eval().state_dict()
    for name, tensor in uninterrupted.model.eval().state_dict().items():
        assert torch.equal(tensor, resumed_state[name]), name
    assert second.model.base_model.pruning_fraction == 1.0  # left at the target schedule


# The training scripts: a run stopped after its checkpoint and resumed with `--resume_from_checkpoint latest` ends
# with the weights of one that never stopped, random flips included (4 batches per epoch, checkpoint after step 6).
SCRIPT_RUN = [
    "--preset", "tiny",
    "--canvas_size", "56",
    "--image_size", "32",
    "--num_train_samples", "32",
    "--num_eval_samples", "8",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--throughput_batch_size", "8",
    "--learning_rate", "5e-3",
    "--lr_scheduler_type", "constant",  # the interrupted run ends earlier: the same rates before and after
    "--save_strategy", "steps",
    "--save_steps", "6",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--use_cpu", "true",
]  # fmt: skip


def saved_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def test_a_script_run_resumed_mid_epoch_with_augmentation_matches_the_uninterrupted_run(tmp_path, caplog):
    run("image-classification", SCRIPT_RUN + ["--output_dir", str(tmp_path / "uninterrupted"), "--max_steps", "10"])
    resumed = tmp_path / "resumed"
    run("image-classification", SCRIPT_RUN + ["--output_dir", str(resumed), "--max_steps", "6"])
    # A later checkpoint killed while saving: Trainer writes trainer_state.json last.
    (resumed / "checkpoint-8").mkdir()
    (resumed / "checkpoint-8" / "config.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="cropr.training.arguments"):
        argv = ["--output_dir", str(resumed), "--max_steps", "10", "--resume_from_checkpoint", "latest"]
        run("image-classification", SCRIPT_RUN + argv)
    assert "Skipping " + str(resumed / "checkpoint-8") + ": it has no trainer_state.json" in caplog.text
    assert "Resuming from " + str(resumed / "checkpoint-6") in caplog.text
    # Epoch 1 of the resumed run flips as the uninterrupted run's epoch 1 (a restarted generator would not).
    expected = saved_weights(tmp_path / "uninterrupted")
    for name, tensor in saved_weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name


def test_training_into_a_folder_with_earlier_checkpoints_needs_a_choice(tmp_path):
    earlier = tmp_path / "checkpoint-3"
    earlier.mkdir()
    (earlier / "trainer_state.json").write_text("{}")
    argv = [*SCRIPT_RUN, "--output_dir", str(tmp_path), "--max_steps", "1"]
    refusal = (
        r"holds 1 checkpoints of an earlier run \(newest checkpoint-3\): continue it with --resume_from_checkpoint "
        r"latest, or start over with --overwrite_output_dir"
    )
    with pytest.raises(RunError, match=refusal):
        run("image-classification", argv)
    run("image-classification", [*argv, "--overwrite_output_dir"])
    assert not earlier.exists()  # replaced by the new run
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()


def test_resuming_needs_a_complete_checkpoint(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()  # interrupted while saving
    argv = [*SCRIPT_RUN, "--output_dir", str(tmp_path), "--max_steps", "8"]
    with pytest.raises(RunError, match="checkpoint-4 is not a complete checkpoint"):
        run("image-classification", [*argv, "--resume_from_checkpoint", str(tmp_path / "checkpoint-4")])
    with pytest.raises(RunError, match="no complete checkpoint in"):
        run("image-classification", [*argv, "--resume_from_checkpoint", "latest"])
    with pytest.raises(RunError, match="--overwrite_output_dir starts over, --resume_from_checkpoint continues"):
        run("image-classification", [*argv, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"])


def test_training_split_flips_by_seed_epoch_and_index_also_in_persistent_workers():
    task = TASKS["image-classification"]
    images = [Image.fromarray((np.arange(48).reshape(4, 4, 3) * (i + 1) % 256).astype(np.uint8)) for i in range(4)]
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3]})
    processor = default_image_processor(task, 4)
    training = TrainingSplit(split, make_transforms(task, processor, augment=True, seed=7))
    unflipped = split.with_transform(make_transforms(task, processor, augment=False, seed=7))
    callback = EpochCallback(training)
    # A worker process kept across epochs must see each new epoch.
    loader = DataLoader(
        training, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=default_data_collator
    )
    # Trainer's state.epoch at an epoch's start: whole, or fractional when resuming mid-epoch.
    for state_epoch, epoch in ((0.0, 0), (1.5, 1), (2.0, 2)):
        callback.on_epoch_begin(None, TrainerState(epoch=state_epoch), None)
        batch = next(iter(loader))
        for index in range(len(split)):
            expected = unflipped[index]["pixel_values"]
            if flip_example(7, epoch, index):
                expected = expected.flip(-1)
            assert torch.equal(training[index]["pixel_values"], expected), (epoch, index)
            assert torch.equal(batch["pixel_values"][index], expected), (epoch, index)
    assert {flip_example(7, epoch, index) for epoch in range(3) for index in range(4)} == {False, True}
