"""MNIST and Fashion-MNIST: where their files are looked for, how they are fetched and read.

    train = load_dataset("fashion-mnist", "train")   # images (60000, 28, 28, 1) uint8, labels (60000,) int64
    test = load_dataset("fashion-mnist", "test")     # images (10000, 28, 28, 1) uint8

Files are looked for in this order; the first directory holding both files of a split wins:

1. the directory the user gives: the data_dir argument (the CLI's --data-dir), then the
   environment variable CNN_GPU_DATA; in each, first <dir>/<name>/ then <dir>/ itself;
2. the user cache, $XDG_CACHE_HOME/cnn_gpu/<name> (default ~/.cache/cnn_gpu/<name>);
3. for Fashion-MNIST, /usr/share/datasets/fashion-mnist (Debian: apt-get install dataset-fashion-mnist).

Failing all of them (and with download=True), the four canonical .gz files are downloaded into
the user cache and checked against their canonical md5. Local files are checked by parsing them,
never by md5: the Debian package and other copies are recompressed, so their .gz bytes differ
while the content is the same.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnn_gpu.data.download import DEFAULT_TIMEOUT_S, DownloadError, download_file
from cnn_gpu.data.idx import read_idx

SPLITS = ("train", "test")
DATA_ENV_VAR = "CNN_GPU_DATA"
IMAGE_SHAPE = (28, 28)

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
    files: Mapping[str, tuple[str, str]] = field(default_factory=lambda: STANDARD_FILES)


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
}


@dataclass
class Dataset:
    """One split of a dataset, on the host.

    images: (N, 28, 28, 1) uint8, channels-last, 0 = background.
    labels: (N,) int64 in [0, len(class_names)).
    source: the directory the files were read from.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    split: str
    source: Path

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for a dataset name ('mnist', 'fashion-mnist'; '_' reads as '-')."""
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def user_cache_dir(name: str) -> Path:
    """$XDG_CACHE_HOME/cnn_gpu/<name>, or ~/.cache/cnn_gpu/<name> (XDG: a relative value is ignored)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "cnn_gpu" / get_spec(name).name


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
    """(images file, labels file) from the first searched directory holding both, or None."""
    spec = get_spec(name)
    images_name, labels_name = spec.files[_check_split(split)]
    for directory, _ in search_locations(spec.name, data_dir):
        images, labels = _find_file(directory, images_name), _find_file(directory, labels_name)
        if images is not None and labels is not None:
            return images, labels
    return None


def download_dataset(name: str, dest: str | os.PathLike | None = None,
                     mirrors: Sequence[str] | None = None, md5: Mapping[str, str] | None = None,
                     splits: Sequence[str] = SPLITS, timeout: float = DEFAULT_TIMEOUT_S,
                     progress: bool = True) -> Path:
    """Download a dataset's .gz files into dest (default: the user cache); return dest.

    mirrors: base URLs tried in order (default: the registry's). md5: file name -> md5,
    overriding the registry's canonical sums (for tests). Files already in dest are kept.
    Raises DownloadError, naming every URL tried and why it failed, when a file cannot be
    fetched intact from any mirror; no partial or unverified file is left in dest.
    """
    spec = get_spec(name)
    dest = Path(dest) if dest is not None else user_cache_dir(spec.name)
    mirrors = tuple(mirrors) if mirrors is not None else spec.mirrors
    sums = {**spec.md5, **(md5 or {})}
    for split in splits:
        for file_name in spec.files[_check_split(split)]:
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
                 md5: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Dataset:
    """Find (or download) and parse one split of a dataset.

    Returns a Dataset: images (N, 28, 28, 1) uint8, labels (N,) int64.
    Raises DatasetNotFoundError naming every place searched when there is no local copy and
    download is False or fails; ValueError when a file is malformed or the image and label
    counts disagree.
    """
    spec = get_spec(name)
    _check_split(split)
    files = find_dataset_files(spec.name, split, data_dir)
    if files is None:
        if not download:
            raise DatasetNotFoundError(not_found_message(spec.name, split, data_dir, None))
        cache = user_cache_dir(spec.name)
        try:
            download_dataset(spec.name, cache, mirrors=mirrors, md5=md5, splits=(split,),
                             timeout=timeout, progress=progress)
        except DownloadError as exc:
            raise DatasetNotFoundError(not_found_message(spec.name, split, data_dir, exc)) from exc
        files = tuple(_find_file(cache, f) for f in spec.files[split])  # type: ignore[assignment]
    images, labels = read_split(spec.name, *files)  # type: ignore[misc]
    return Dataset(images=images, labels=labels, class_names=spec.class_names, name=spec.name,
                   split=split, source=files[0].parent)


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
