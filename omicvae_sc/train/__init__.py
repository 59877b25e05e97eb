"""Pure torch: the training loop, the KL schedule, early stopping and the history."""

from omicvae_sc.train._checkpoint import CheckpointPlan, read_checkpoint
from omicvae_sc.train._distributed import RankLost, Team
from omicvae_sc.train._files import temp_dir, temp_file
from omicvae_sc.train._heap import steady_heap
from omicvae_sc.train._history import History
from omicvae_sc.train._trainer import (
    TrainConfig,
    TrainingDiverged,
    default_max_epochs,
    fit,
    kl_weight_at,
)

__all__ = ["CheckpointPlan", "History", "RankLost", "Team", "TrainConfig", "TrainingDiverged",
           "default_max_epochs", "fit", "kl_weight_at", "read_checkpoint", "steady_heap",
           "temp_dir", "temp_file"]
