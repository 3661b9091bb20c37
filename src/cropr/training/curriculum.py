"""The pruning curriculum as a `TrainerCallback`: the tokens removed (R) grow linearly from none to the target, and
then, for elastic training, vary from step to step."""

from __future__ import annotations

import math

import numpy as np
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class PruningCurriculumCallback(TrainerCallback):
    """Raise every module's removal count linearly from 0 to its target over the first `ramp_fraction` of training.

    The fraction is a pure function of `state.global_step` (or of the epoch with `per_epoch=True`, the reference's
    `linspace(0, R, epochs / 2)`), so a run resumed from a checkpoint continues exactly where it stopped. Only
    training forwards are affected: evaluation always runs the target schedule.

    Elastic training (`elastic_min_fraction`): once the ramp is over, every step draws its fraction uniformly from
    `[elastic_min_fraction, 1]`, so that one checkpoint learns to run at every rate in that range (its routers only
    rank tokens; the backbone and head learn to cope with fewer of them). The draw is a pure function of `seed` and
    the step, so it is reproducible, identical on every process of a distributed run, and a resumed run draws what
    an uninterrupted one would.

    Args:
        ramp_fraction: share of the training steps over which the pruning rises; 0 disables the curriculum.
        per_epoch: step the fraction once per epoch instead of every optimizer step.
        elastic_min_fraction: lowest pruning fraction of elastic training, in [0, 1); `None` trains the target only.
        seed: seed of the elastic draws.
    """

    def __init__(
        self,
        ramp_fraction: float = 0.5,
        per_epoch: bool = False,
        elastic_min_fraction: float | None = None,
        seed: int = 0,
    ):
        if not 0.0 <= ramp_fraction <= 1.0:
            raise ValueError(f"`ramp_fraction` must be in [0, 1], got {ramp_fraction}")
        if elastic_min_fraction is not None and not 0.0 <= elastic_min_fraction < 1.0:
            raise ValueError(f"`elastic_min_fraction` must be in [0, 1), got {elastic_min_fraction}")
        self.ramp_fraction = ramp_fraction
        self.per_epoch = per_epoch
        self.elastic_min_fraction = elastic_min_fraction
        self.seed = seed

    def fraction_at(self, state: TrainerState) -> float:
        """Pruning fraction for the next training step."""
        fraction = self.curriculum_fraction_at(state)
        if fraction < 1.0 or self.elastic_min_fraction is None:
            return fraction
        draw = np.random.default_rng([self.seed, state.global_step]).random()
        return self.elastic_min_fraction + (1.0 - self.elastic_min_fraction) * float(draw)

    def curriculum_fraction_at(self, state: TrainerState) -> float:
        """The ramp's fraction for the next training step (1 once it is over)."""
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
