"""Fine-tuning: ``train(TrainSpec, TrainHooks) -> TrainResult`` (see recipe.py)."""

from tunelab.training.recipe import (
    Cancelled,
    Checkpoint,
    Paused,
    TrainHooks,
    TrainingError,
    TrainResult,
    TrainSpec,
    train,
)

__all__ = ["Cancelled", "Checkpoint", "Paused", "TrainHooks", "TrainResult", "TrainSpec", "TrainingError", "train"]
