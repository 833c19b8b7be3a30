"""The data contract: typed records, readers/writers, featurization and training pairs."""

from uue.data.featurize import Featurizer, collate, hash_metadata, trim_batch
from uue.data.readers import UUEDataset, load_dataset, write_dataset, write_table
from uue.data.schema import DataValidationError, Label, Statement, UserChunk, UserData

__all__ = [
    "DataValidationError", "Featurizer", "Label", "Statement", "UUEDataset", "UserChunk", "UserData", "collate",
    "hash_metadata", "load_dataset", "trim_batch", "write_dataset", "write_table",
]
