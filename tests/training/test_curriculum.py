import pytest
import torch
from conftest import tiny_config_kwargs
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.training.curriculum import PruningCurriculumCallback


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (5, 0.25), (10, 0.5), (20, 1.0), (30, 1.0), (40, 1.0)])
def test_step_fraction_rises_linearly_over_the_ramp(step, expected):
    state = TrainerState(max_steps=40, global_step=step)
    assert PruningCurriculumCallback(ramp_fraction=0.5).fraction_at(state) == pytest.approx(expected)


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (7, 1.0)])
def test_epoch_fraction_follows_the_reference_linspace(epoch, expected):
    # 8 epochs, ramp over half: linspace(0, R, 4) for epochs 0-3, then R.
    state = TrainerState(num_train_epochs=8, epoch=float(epoch))
    assert PruningCurriculumCallback(ramp_fraction=0.5, per_epoch=True).fraction_at(state) == pytest.approx(expected)


def test_no_ramp_means_full_pruning_from_the_start():
    assert PruningCurriculumCallback(ramp_fraction=0.0).fraction_at(TrainerState(max_steps=10)) == 1.0
    with pytest.raises(ValueError, match="ramp_fraction"):
        PruningCurriculumCallback(ramp_fraction=2.0)


class RandomImages(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": index % 5}


class KeptTokenRecorder(TrainerCallback):
    """Records, at each step, how many tokens the first module keeps in a training forward."""

    def __init__(self):
        self.kept = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            output = model(torch.zeros(1, 3, 32, 32), output_kept_indices=True)
        self.kept.append(output.kept_indices[0].shape[1])


def test_trainer_applies_the_curriculum_at_each_step(tmp_path):
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs(pruning_rate=4)))
    recorder = KeptTokenRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=8,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(),
        callbacks=[PruningCurriculumCallback(ramp_fraction=0.5), recorder],
    )
    trainer.train()
    # First module removes 5 (R + 1 for CLS) of 16 patches at full rate: fraction step/4 over steps 0..3.
    assert recorder.kept == [17, 16, 15, 13, 12, 12, 12, 12]
    assert model.cropr_vit.pruning_fraction == 1.0


def elastic_fractions(callback: PruningCurriculumCallback, steps: range, max_steps: int = 100) -> list[float]:
    return [callback.fraction_at(TrainerState(max_steps=max_steps, global_step=step)) for step in steps]


def test_elastic_fractions_lie_in_range_and_follow_the_seed():
    fractions = elastic_fractions(PruningCurriculumCallback(0.0, elastic_min_fraction=0.25, seed=3), range(200))
    assert all(0.25 <= fraction <= 1.0 for fraction in fractions)
    assert min(fractions) < 0.3 and max(fractions) > 0.95  # the whole range is drawn
    assert len(set(fractions)) == 200
    again = elastic_fractions(PruningCurriculumCallback(0.0, elastic_min_fraction=0.25, seed=3), range(200))
    other_seed = elastic_fractions(PruningCurriculumCallback(0.0, elastic_min_fraction=0.25, seed=4), range(200))
    assert again == fractions and other_seed != fractions
    with pytest.raises(ValueError, match="elastic_min_fraction"):
        PruningCurriculumCallback(0.0, elastic_min_fraction=1.0)


def test_elastic_draws_start_after_the_ramp():
    callback = PruningCurriculumCallback(0.5, elastic_min_fraction=0.5, seed=0)
    fractions = elastic_fractions(callback, range(40), max_steps=40)
    assert fractions[:20] == pytest.approx([step / 20 for step in range(20)])
    assert all(0.5 <= fraction <= 1.0 for fraction in fractions[20:]) and len(set(fractions[20:])) == 20


class FractionRecorder(TrainerCallback):
    """Records the pruning fraction each training step runs at (called after the pruning callback)."""

    def __init__(self):
        self.fractions = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.fractions[state.global_step] = model.cropr_vit.pruning_fraction


def elastic_trainer(tmp_path, resume: bool = False) -> tuple[Trainer, FractionRecorder]:
    torch.manual_seed(0)
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs(pruning_rate=4)))
    recorder = FractionRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=6,
        save_steps=3,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=11,
    )
    callback = PruningCurriculumCallback(0.0, elastic_min_fraction=0.2, seed=args.seed)
    return Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=[callback, recorder]), recorder


def test_a_resumed_elastic_run_draws_what_an_uninterrupted_one_draws(tmp_path):
    trainer, uninterrupted = elastic_trainer(tmp_path / "full")
    trainer.train()
    assert sorted(uninterrupted.fractions) == list(range(6))
    trainer, resumed = elastic_trainer(tmp_path / "full")
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert sorted(resumed.fractions) == [3, 4, 5]
    assert all(resumed.fractions[step] == uninterrupted.fractions[step] for step in (3, 4, 5))
    assert all(0.2 <= fraction <= 1.0 for fraction in uninterrupted.fractions.values())
    assert trainer.model.cropr_vit.pruning_fraction == 1.0  # back at the target schedule for what follows
