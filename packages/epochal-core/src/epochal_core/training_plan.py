"""How many updates and epochs a run makes, and where a resumed run picks up."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from .training_args import TrainingArguments

__all__ = ["TrainingPlan", "plan_training"]


@dataclass(frozen=True)
class TrainingPlan:
    """The shape of a training run, fixed before it starts.

    Args:
        max_steps: Optimizer updates in total.
        num_train_epochs: Epochs to run (``sys.maxsize`` for a dataset without length).
        updates_per_epoch: Optimizer updates per epoch.
        batches_per_epoch: Micro-batches per epoch.
        accumulation: ``gradient_accumulation_steps``.
        sized: Whether the training batches have a length.
    """

    max_steps: int
    num_train_epochs: int
    updates_per_epoch: int
    batches_per_epoch: int
    accumulation: int
    sized: bool

    def resume_position(self, global_step: int, ignore_data_skip: bool) -> tuple[int, int]:
        """``(epoch, micro-batches to skip in it)`` where a run at ``global_step`` goes on."""
        skip = 0 if ignore_data_skip else (global_step % self.updates_per_epoch) * self.accumulation
        return global_step // self.updates_per_epoch, skip


def plan_training(args: TrainingArguments, num_batches: int | None) -> TrainingPlan:
    """Plan a run over ``num_batches`` micro-batches per epoch (``None``: the dataset has no length).

    Raises:
        ValueError: The dataset yields no batch, or has no length and ``max_steps`` is not set.
    """
    ga = args.gradient_accumulation_steps
    if num_batches is None:
        if args.max_steps <= 0:
            raise ValueError(
                f"TrainingArguments.max_steps={args.max_steps} is invalid: the train_dataset has no length, "
                "so set max_steps > 0."
            )
        return TrainingPlan(args.max_steps, sys.maxsize, args.max_steps, args.max_steps * ga, ga, sized=False)
    if num_batches == 0:
        raise ValueError(
            "train_dataset yields no batch: it is empty, or smaller than per_device_train_batch_size="
            f"{args.per_device_train_batch_size} with dataloader_drop_last=True."
        )
    updates_per_epoch = max(num_batches // ga + int(num_batches % ga > 0), 1)
    if args.max_steps > 0:
        max_steps = args.max_steps
        epochs = max_steps // updates_per_epoch + int(max_steps % updates_per_epoch > 0)
    else:
        max_steps = math.ceil(args.num_train_epochs * updates_per_epoch)
        epochs = math.ceil(args.num_train_epochs)
    return TrainingPlan(max_steps, epochs, updates_per_epoch, num_batches, ga, sized=True)
