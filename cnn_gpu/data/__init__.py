"""Datasets (MNIST, Fashion-MNIST), IDX files, preprocessing and batching.

    from cnn_gpu.data import load_dataset, compute_norm_stats, normalize, BatchIterator
    train = load_dataset("fashion-mnist", "train")   # images (60000, 28, 28, 1) uint8
"""
from cnn_gpu.data.datasets import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    DatasetSpec,
    download_dataset,
    find_dataset_files,
    load_dataset,
    search_locations,
    user_cache_dir,
)
from cnn_gpu.data.download import DownloadError, download_file
from cnn_gpu.data.idx import read_idx, write_idx
from cnn_gpu.data.loader import BatchIterator, train_val_split
from cnn_gpu.data.transforms import (
    Augmentation,
    NormStats,
    augmentation_for,
    compute_norm_stats,
    normalize,
    random_erase,
    random_hflip,
    random_shift,
    to_unit_float,
)

__all__ = [
    "DATASETS", "Augmentation", "BatchIterator", "Dataset", "DatasetNotFoundError", "DatasetSpec",
    "DownloadError", "NormStats", "augmentation_for", "compute_norm_stats", "download_dataset",
    "download_file", "find_dataset_files", "load_dataset", "normalize", "random_erase", "random_hflip",
    "random_shift", "read_idx", "search_locations", "to_unit_float", "train_val_split",
    "user_cache_dir", "write_idx",
]
