"""The pruning curriculum as a `TrainerCallback`: the tokens removed (R) grow linearly from none to the target."""

from __future__ import annotations

import math

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class PruningCurriculumCallback(TrainerCallback):
    """Raise every module's removal count linearly from 0 to its target over the first `ramp_fraction` of training.

    The fraction is a pure function of `state.global_step` (or of the epoch with `per_epoch=True`, the reference's
    `linspace(0, R, epochs / 2)`), so a run resumed from a checkpoint continues exactly where it stopped. Only
    training forwards are affected: evaluation always runs the target schedule.

    Args:
        ramp_fraction: share of the training steps over which the pruning rises; 0 disables the curriculum.
        per_epoch: step the fraction once per epoch instead of every optimizer step.
    """

    def __init__(self, ramp_fraction: float = 0.5, per_epoch: bool = False):
        if not 0.0 <= ramp_fraction <= 1.0:
            raise ValueError(f"`ramp_fraction` must be in [0, 1], got {ramp_fraction}")
        self.ramp_fraction = ramp_fraction
        self.per_epoch = per_epoch

    def fraction_at(self, state: TrainerState) -> float:
        """Pruning fraction for the next training step."""
        if self.ramp_fraction == 0.0:
            return 1.0
        if self.per_epoch:
            num_epochs = max(math.ceil(state.num_train_epochs), 1)
            ramp_epochs = max(math.ceil(num_epochs * self.ramp_fraction), 1)
            # linspace(0, 1, ramp_epochs) over the first epochs, then 1.
            epoch = int(state.epoch or 0)
            return 1.0 if epoch >= ramp_epochs or ramp_epochs == 1 else epoch / (ramp_epochs - 1)
        ramp_steps = max(state.max_steps * self.ramp_fraction, 1.0)
        return min(state.global_step / ramp_steps, 1.0)

    def _apply(self, state: TrainerState, model) -> None:
        if model is not None:
            model.set_pruning_fraction(self.fraction_at(state))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._apply(state, kwargs.get("model"))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._apply(state, kwargs.get("model"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Leave the model at its target schedule for whatever the user does with it next.
        model = kwargs.get("model")
        if model is not None:
            model.set_pruning_fraction(1.0)


__all__ = ["PruningCurriculumCallback"]
