"""Tasks: datasets (IDX reader, search/download, loading), partitioning across peers, models."""

from .datasets import (
    Dataset,
    DatasetNotFoundError,
    clear_dataset_cache,
    download,
    find_data_dir,
    load_dataset,
)
from .idx import read_idx, write_idx
from .models import SmallCNN, build_model, count_parameters
from .partition import partition

__all__ = [
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
