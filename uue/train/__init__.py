"""Training: what a step computes (objective.py: the model, its samplers and losses), one step (step.py), one
loop (loop.py) over one user-row stream (stream.py) for one process (local.py) and Ray Train workers (ray.py),
one checkpoint layout (checkpoint.py)."""

from uue.train.local import TrainResult, UUETrainer
from uue.train.loop import TrainProbe
from uue.train.objective import TrainingObjective
from uue.train.step import param_groups, train_step, warmup_cosine

__all__ = ["TrainProbe", "TrainResult", "TrainingObjective", "UUETrainer", "param_groups", "train_step",
           "warmup_cosine"]
