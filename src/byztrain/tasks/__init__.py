"""Tasks: datasets (IDX reader, search/download, loading), partitioning across peers, models."""

from .datasets import (
    DATASET_NAMES,
    Dataset,
    DatasetNotFoundError,
    clear_dataset_cache,
    download,
    find_data_dir,
    load_dataset,
)
from .idx import read_idx, write_idx
from .models import MODEL_NAMES, SmallCNN, build_model, count_parameters
from .partition import SPLITS, partition

__all__ = [
    "DATASET_NAMES",
    "MODEL_NAMES",
    "SPLITS",
    "Dataset",
    "DatasetNotFoundError",
    "SmallCNN",
    "build_model",
    "clear_dataset_cache",
    "count_parameters",
    "download",
    "find_data_dir",
    "load_dataset",
    "partition",
    "read_idx",
    "write_idx",
]
