"""Universal User Embeddings: one vector per user from their text history, one per statement about people."""

from uue.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainingConfig, load_config
from uue.data import DataValidationError, Statement, UserChunk, UserData, UUEDataset, load_dataset
from uue.model import UUEModel
from uue.model.inference import UUEEvaluator, UUEInference
from uue.train import UUETrainer, train_step

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataConfig", "DataValidationError", "ExperimentConfig", "ModelConfig", "Statement",
    "TrainingConfig", "UUEDataset", "UUEEvaluator", "UUEInference", "UUEModel", "UUETrainer", "UserChunk",
    "UserData", "load_config", "load_dataset", "train_step",
]
