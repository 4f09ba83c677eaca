"""Training the networks a method needs beyond the score model (AGDM's auxiliary network)."""

from .auxiliary import (
                        AuxTrainConfig,
                        auxiliary_accuracy,
                        init_auxiliary,
                        noise_augment,
                        noisy_accuracy,
                        trades_inner_max,
                        train_auxiliary,
)

__all__ = ["AuxTrainConfig", "auxiliary_accuracy", "init_auxiliary", "noise_augment", "noisy_accuracy",
           "train_auxiliary", "trades_inner_max"]
