"""A Trainer run stopped mid-curriculum and resumed from its checkpoint equals the uninterrupted run.

The R curriculum is a pure function of `state.global_step`, so the resumed run must continue the same pruning
fractions, and with `full_determinism` (no dropout / drop-path, the generator-free Cropr selector) it must reach
the same final weights as a run of the same length that never stopped.
"""

import os

import pytest
import torch
from conftest import tiny_config_kwargs
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.curriculum import PruningCurriculumCallback

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
        self.fractions[state.global_step] = model.backbone.pruning_fraction


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
    assert second.model.backbone.pruning_fraction == 1.0  # left at the target schedule
