"""Datasets (MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100, folders of your own images), IDX files,
preprocessing and batching.

    from cnn_gpu.data import load_dataset, compute_norm_stats, normalize, BatchIterator
    train = load_dataset("fashion-mnist", "train")   # images (60000, 28, 28, 1) uint8
    train = load_dataset("cifar10", "train")         # images (50000, 32, 32, 3) uint8
    photos = load_image_folder("photos/", image_size=(64, 64))   # .train, .test: memory-mapped
"""
from cnn_gpu.data.datasets import (
    DATASET_NAMES,
    DATASETS,
    IMAGE_FOLDER,
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
from cnn_gpu.data.folder import ImageFolder, load_image_folder, scan_image_folder
from cnn_gpu.data.idx import read_idx, write_idx
from cnn_gpu.data.images import (
    IMAGE_EXTENSIONS,
    RESIZE_MODES,
    ImageDecodeError,
    decode_image,
    parse_image_size,
)
from cnn_gpu.data.inputs import Inputs, input_files, read_input, read_inputs
from cnn_gpu.data.loader import BatchIterator, Subset, is_on_disk, subset, train_val_split
from cnn_gpu.data.transforms import (
    AUGMENT_DEFAULTS,
    Augmentation,
    AugmentDefaults,
    NormStats,
    augmentation_defaults,
    augmentation_for,
    compute_norm_stats,
    normalize,
    random_crop,
    random_erase,
    random_hflip,
    random_shift,
    to_unit_float,
)

__all__ = [
    "AUGMENT_DEFAULTS", "DATASETS", "DATASET_NAMES", "IMAGE_EXTENSIONS", "IMAGE_FOLDER", "RESIZE_MODES",
    "AugmentDefaults", "Augmentation", "BatchIterator", "Dataset", "DatasetNotFoundError", "DatasetSpec",
    "DownloadError", "ImageDecodeError", "ImageFolder", "Inputs", "NormStats", "Subset", "augmentation_defaults",
    "augmentation_for", "compute_norm_stats", "decode_image", "download_dataset", "download_file",
    "find_dataset_files", "is_on_disk", "load_dataset", "load_image_folder", "normalize", "parse_image_size",
    "random_crop", "random_erase", "random_hflip", "random_shift", "read_idx", "read_input", "read_inputs",
    "scan_image_folder", "search_locations", "subset", "to_unit_float", "train_val_split", "user_cache_dir",
    "write_idx",
]
