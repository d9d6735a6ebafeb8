"""The shared local training loop."""

from blindtune.training.loop import NonFiniteLossError, TrainConfig, TrainStats, train

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainStats", "train"]
