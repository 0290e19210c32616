"""A folder of your own images as a dataset, decoded once into a memory-mapped cache.

    folder = load_image_folder("photos/", image_size=(32, 32))    # or load_dataset("images", split, data_dir=...)
    folder.train.images    # (N, 32, 32, C) uint8, a read-only np.memmap of the cache
    folder.train.labels    # (N,) int64 indices into folder.class_names
    folder.notes           # what was skipped, converted, resized; whether the cache was reused

Layouts (the convention of torchvision's ImageFolder and Keras' image_dataset_from_directory):

    root/<class>/<image>                          one folder: the test split is cut from it (below)
    root/train/<class>/<image>, root/test/<class>/<image>   the two splits as given
    root/train/<class>/<image> alone              the test split is cut from train/

Images may sit in sub-folders of a class folder (they belong to that class). Class names are the
class folders' names, sorted; a label is the index of its class in that order. Ignored, each
with a note: hidden entries (any name starting with '.', such as .DS_Store, .ipynb_checkpoints
and this module's own .cnn_gpu_cache, and __MACOSX), files that are not images (by extension,
any case: IMAGE_EXTENSIONS), files outside a class folder, folders beside train/ and test/, and
class folders that hold no image (skipped: they are not classes). A class in test/ that train/
lacks is an error.

The cut test split is stratified and seeded: in each class, the files are ranked by a hash of
(split_seed, their path) and the round(n * test_fraction) first go to test (a class keeps at least
one training image). A file's side depends only on its own path and its class's size, so adding
images moves at most one image per class from test to train, never the whole split around.

How pixels are prepared (channels, resizing, 16-bit and float images, alpha): cnn_gpu.data.images.
channels=None takes what most images have (grayscale or colour; a tie counts as colour);
image_size=None takes the size all images share, and is an error naming the sizes when they differ.

The cache (cnn_gpu.data.cache): in root/.cnn_gpu_cache/ when that can be written, else under
user_cache_dir("images"), or in cache_dir. It is reused while every file keeps its path, size and
modification time (as make and rsync judge a file: an edit that keeps both is not seen) and the
options match, and rebuilt (with a note saying why) otherwise. One cache per folder: other options
replace it. Files are decoded by a few threads (workers), in a fixed order, so the result is the
same for any number of them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import cache as cache_files
from .datasets import IMAGE_FOLDER, SPLITS, Dataset, DatasetNotFoundError, user_cache_dir
from .images import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    ImageDecodeError,
    channels_of_mode,
    check_resize_mode,
    decode_image,
    hw,
    is_hidden,
    is_image_file,
    parse_image_size,
    read_header,
    require_pillow,
    warning_note,
)

CACHE_SUBDIR = ".cnn_gpu_cache"
BESIDE_STEM = "images"  # the cache's file stem in root/.cnn_gpu_cache/
DEFAULT_TEST_FRACTION = 0.2
SKIP_HINT = "pass skip_bad=True (the CLI's --skip-bad-images) to leave such files out"
_MAX_NOTE_KINDS = 8


class ScannedFile(NamedTuple):
    path: str  # relative to the root, '/'-separated
    size: int  # bytes
    mtime_ns: int
    label: int
    split: str  # "train" or "test"


class FolderScan(NamedTuple):
    root: Path
    layout: str  # "train/test" (both folders given), "train only" or "one folder" (test split cut)
    class_names: tuple[str, ...]
    files: tuple[ScannedFile, ...]  # the stored order: train files, then test files, each by (label, path)
    notes: tuple[str, ...]

    @property
    def split_is_cut(self) -> bool:
        return self.layout != "train/test"


def _list_dir(directory: Path) -> tuple[list[str], list[str]]:
    """(visible sub-folder names, visible file names) of a directory, each sorted."""
    folders, files = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            if is_hidden(entry.name):
                continue
            (folders if entry.is_dir() else files).append(entry.name)
    return sorted(folders), sorted(files)


def _walk_images(folder: Path) -> tuple[list[tuple[Path, os.stat_result]], list[str]]:
    """Every visible image file under folder, at any depth, with its stat; and the names of the
    other visible files. Follows symbolic links, visiting each real directory once."""
    images, others = [], []
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        directory = stack.pop()
        st = directory.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(directory) as entries:
            for entry in entries:
                if is_hidden(entry.name):
                    continue
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    if is_image_file(entry.name):
                        images.append((Path(entry.path), entry.stat()))
                    else:
                        others.append(entry.name)
    return images, others


def _class_folders(root: Path, directory: Path, notes: list[str]) -> dict[str, list[tuple[str, int, int]]]:
    """class name -> [(path relative to root, size, mtime_ns)] of each class folder in directory."""
    folders, loose = _list_dir(directory)
    where = directory.relative_to(root).as_posix() + "/" if directory != root else ""
    loose_images = [n for n in loose if is_image_file(n)]
    if loose_images:
        notes.append(f"ignored {len(loose_images)} image file(s) directly in {directory} (e.g. {loose_images[0]}): "
                     f"images belong in a class folder, {where}<class>/<image>")
    classes: dict[str, list[tuple[str, int, int]]] = {}
    other_kinds: Counter[str] = Counter()
    for name in folders:
        images, others = _walk_images(directory / name)
        classes[name] = sorted((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns) for p, st in images)
        other_kinds.update(os.path.splitext(n)[1].lower() or n for n in others)
    if other_kinds:
        kinds = ", ".join(f"{k} ({n})" for k, n in other_kinds.most_common(5))
        notes.append(f"ignored {sum(other_kinds.values())} file(s) in {where or 'the'} class folders that are not "
                     f"images by their extension: {kinds}; images are {', '.join(IMAGE_EXTENSIONS)} in any case")
    return classes


def _test_rank(split_seed: int, path: str) -> bytes:
    return hashlib.blake2b(f"{split_seed}/{path}".encode(), digest_size=8).digest()


def cut_test_split(paths: Sequence[str], test_fraction: float, split_seed: int) -> set[str]:
    """Of one class's files, those that go to the test split: round(n * test_fraction), at most
    n - 1, the ones of lowest hash of (split_seed, path)."""
    n_test = min(round(len(paths) * test_fraction), len(paths) - 1) if paths else 0
    return set(sorted(paths, key=lambda p: _test_rank(split_seed, p))[:max(n_test, 0)])


def scan_image_folder(root: str | os.PathLike, test_fraction: float = DEFAULT_TEST_FRACTION,
                      split_seed: int = 0) -> FolderScan:
    """List an image folder: its layout, classes, and image files in stored order (no decoding).

    Raises DatasetNotFoundError when root is not a folder; ValueError when it holds no class
    folder with an image, or test/ has a class that train/ lacks.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} " + ("is not a folder" if root.exists() else "does not exist"))
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    notes: list[str] = []
    folders, _ = _list_dir(root)
    if "train" in folders:
        train = _class_folders(root, root / "train", notes)
        test = _class_folders(root, root / "test", notes) if "test" in folders else None
        layout = "train/test" if test is not None else "train only"
        beside = [f for f in folders if f not in ("train", "test")]
        if beside:
            notes.append(f"ignored folder(s) {', '.join(beside)} beside train/: only train/ and test/ are read "
                         "(the validation split is cut from train/)")
    else:
        train, test, layout = _class_folders(root, root, notes), None, "one folder"
    class_names = tuple(name for name, files in train.items() if files)
    empty = [name for name, files in train.items() if not files]
    if empty:
        notes.append(f"class folder(s) {', '.join(empty)} hold no images: skipped (they are not classes)")
    if not class_names:
        expected = f"{root}/<class>/<image> or {root}/train/<class>/<image> and {root}/test/<class>/<image>"
        raise ValueError(f"no images found in {root}: expected {expected}, with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)} (any case)")
    label = {name: i for i, name in enumerate(class_names)}
    files: list[ScannedFile] = []
    if test is None:
        test_paths = set().union(*(cut_test_split([f[0] for f in train[c]], test_fraction, split_seed)
                                   for c in class_names))
        for split in SPLITS:
            files += [ScannedFile(*f, label=label[c], split=split) for c in class_names for f in train[c]
                      if (f[0] in test_paths) == (split == "test")]
        source = "train/" if layout == "train only" else "the folder"
        notes.append(f"the test split is cut from {source}: {sum(f.split == 'test' for f in files)} images "
                     f"(test_fraction {test_fraction:g}, split_seed {split_seed}, in every class)")
    else:
        unknown = [name for name, paths in test.items() if paths and name not in label]
        if unknown:
            raise ValueError(f"{root / 'test'} has class folder(s) {', '.join(unknown)} that {root / 'train'} lacks; "
                             f"the classes of train/ are: {', '.join(class_names)}")
        files += [ScannedFile(*f, label=label[c], split="train") for c in class_names for f in train[c]]
        files += [ScannedFile(*f, label=label[c], split="test") for c in class_names for f in test.get(c, [])]
        missing = [c for c in class_names if not test.get(c)]
        if missing:
            notes.append(f"test/ has no images of class(es) {', '.join(missing)}")
    return FolderScan(root=root, layout=layout, class_names=class_names, files=tuple(files), notes=tuple(notes))


@dataclass
class ImageFolder:
    """An image folder read into arrays: both splits, and what was done to read them."""

    root: Path
    class_names: tuple[str, ...]
    images: np.ndarray  # (N, H, W, C) uint8, train images then test images; a read-only np.memmap when cached
    labels: np.ndarray  # (N,) int64
    paths: tuple[str, ...]  # (N,) each image's file, relative to root
    n_train: int
    options: dict[str, Any]  # resolved: channels, image_size, resize, test_fraction, split_seed, skip_bad
    skipped: tuple[tuple[str, str], ...] = ()  # (path relative to root, why) of files left out
    notes: tuple[str, ...] = ()
    cache_path: Path | None = None  # the index file, or None when not cached
    cache_reused: bool = False
    layout: str = "one folder"

    def _range(self, split: str) -> slice:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return slice(0, self.n_train) if split == "train" else slice(self.n_train, len(self.labels))

    def split(self, split: str) -> Dataset:
        """One split as a Dataset; its images are a slice of self.images (no copy)."""
        part = self._range(split)
        return Dataset(images=self.images[part], labels=self.labels[part], class_names=self.class_names,
                       name=IMAGE_FOLDER, split=split, source=self.root, options=dict(self.options),
                       notes=self.notes)

    @property
    def train(self) -> Dataset:
        return self.split("train")

    @property
    def test(self) -> Dataset:
        return self.split("test")

    def split_paths(self, split: str) -> tuple[str, ...]:
        """The file of each image of a split, relative to root, in the split's order."""
        return self.paths[self._range(split)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    def describe(self) -> str:
        """One line: where from, classes, split sizes, image shape, skips and the cache."""
        h, w, c = self.image_shape
        n_test = len(self.labels) - self.n_train
        cache = "no cache" if self.cache_path is None else \
            f"cache {'reused' if self.cache_reused else 'written'}: {self.cache_path}"
        skipped = f", {len(self.skipped)} unreadable file(s) skipped" if self.skipped else ""
        return (f"images from {self.root} ({self.layout}): {len(self.class_names)} classes, {self.n_train} training "
                f"and {n_test} test images of {h}x{w}x{c} (resize mode {self.options['resize']}){skipped}; {cache}")


def _stem_for(root: Path) -> str:
    """A cache file stem unique to a root folder, for caches kept away from it."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', root.resolve().name) or 'root'}-{digest}"


def cache_location(root: Path, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(directory, file stem) of a folder's cache: cache_dir when given; else root/.cnn_gpu_cache
    when it holds an index or can be written; else the user cache, user_cache_dir('images')."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser(), _stem_for(root)
    beside = root / CACHE_SUBDIR
    if cache_files.index_path(beside, BESIDE_STEM).is_file() or cache_files.writable_directory(beside):
        return beside, BESIDE_STEM
    return user_cache_dir(IMAGE_FOLDER), _stem_for(root)


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Any]:
    """A tqdm.auto bar when tqdm is installed and enabled: a widget in notebooks, and on a console only
    when stderr is a terminal (disable=None), so a log or a captured stderr holds no bar text."""
    bar = None
    if enabled and total:
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency

            bar = tqdm(total=total, desc=description, unit="img", leave=False, file=sys.stderr, disable=None)
        except ImportError:
            pass
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _resolve(scan: FolderScan, channels: int | None, image_size: tuple[int, int] | None, skip_bad: bool,
             progress: bool, skipped: dict[str, str], notes: list[str]) -> tuple[int, tuple[int, int]]:
    """channels and (H, W) to decode to: as given, else from the images' headers (no decoding)."""
    modes: Counter[str] = Counter()
    sizes: dict[tuple[int, int], list[str]] = {}
    with _progress(len(scan.files), "reading image headers", progress) as bar:
        for f in scan.files:
            try:
                header = read_header(scan.root / f.path)
            except ImageDecodeError as exc:
                if not skip_bad:
                    raise ImageDecodeError(f"{exc}; {SKIP_HINT}") from exc
                skipped[f.path] = str(exc)
                continue
            finally:
                if bar is not None:
                    bar.update(1)
            modes[header.mode] += 1
            sizes.setdefault(header.size, []).append(f.path)
    if not modes:
        raise ValueError(f"none of the {len(scan.files)} image files in {scan.root} could be read")
    if channels is None:
        gray = sum(n for mode, n in modes.items() if channels_of_mode(mode) == 1)
        channels = 1 if gray > sum(modes.values()) - gray else 3
        if len(modes) > 1:
            counts = ", ".join(f"{n} {mode}" for mode, n in modes.most_common())
            notes.append(f"channels {channels}, what most images have ({counts}); give channels (--channels) "
                         "to choose")
    if image_size is None:
        if len(sizes) > 1:
            listed = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
            shown = "; ".join(f"{hw(size)}: {len(paths)} (e.g. {paths[0]})" for size, paths in listed[:5])
            more = f"; and {len(listed) - 5} other sizes" if len(listed) > 5 else ""
            raise ValueError(f"the images in {scan.root} differ in size (HxW): {shown}{more}. Give image_size=(H, W) "
                             "(the CLI's --image-size HxW) to bring them to one size; resize='resize' stretches, "
                             "'crop' cuts the centre of the target's shape")
        image_size = next(iter(sizes))
    return channels, image_size


def _ordered_map(fn: Callable[[int], Any], items: Sequence[int], workers: int) -> Iterator[Any]:
    """fn(item) for each item, in order, computed by `workers` threads a bounded window ahead
    (Executor.map would submit every item at once: a million futures for a million files)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnn_gpu-decode")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Decoding threads: the usable CPUs, at most 8 (Pillow's decoders and resampling release the GIL)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, usable))


def _summarize(kinds: Counter[str]) -> list[str]:
    lines = [f"{note}: {n} image(s)" for note, n in kinds.most_common(_MAX_NOTE_KINDS)]
    if len(kinds) > _MAX_NOTE_KINDS:
        rest = sum(n for _, n in kinds.most_common()[_MAX_NOTE_KINDS:])
        lines.append(f"... and {len(kinds) - _MAX_NOTE_KINDS} other kinds of change ({rest} image(s))")
    return lines


def _request(channels: int | None, image_size: tuple[int, int] | None, resize: str, test_fraction: float,
             split_seed: int, skip_bad: bool) -> dict[str, Any]:
    return {"channels": channels, "image_size": None if image_size is None else list(image_size), "resize": resize,
            "test_fraction": test_fraction, "split_seed": split_seed, "skip_bad": skip_bad}


def _mismatch(index: dict, request: dict[str, Any], files: list[list]) -> str | None:
    """Why a cache index does not serve this request and these files, or None when it does."""
    if index.get("files") != files:
        old = {f[0]: f[1:] for f in index.get("files", [])}
        new = {f[0]: f[1:] for f in files}
        changed = sum(1 for p in new if p in old and old[p] != new[p])
        added, removed = len(new.keys() - old.keys()), len(old.keys() - new.keys())
        parts = [f"{n} {what}" for n, what in ((changed, "changed"), (added, "added"), (removed, "removed")) if n]
        return f"the folder changed ({', '.join(parts)} file(s))"
    stored, resolved = index.get("request", {}), index.get("resolved", {})
    for key in ("channels", "image_size"):
        # None (decide from the images) matches a cache that decided too; a value matches what it holds.
        ok = stored.get(key) is None if request[key] is None else request[key] == resolved.get(key)
        if not ok:
            return f"{key} {request[key]} differs from the cache's {resolved.get(key)}"
    keys = ["resize"] + (["test_fraction", "split_seed"] if index.get("split_is_cut") else [])
    for key in keys:
        if request[key] != stored.get(key):
            return f"{key} {request[key]!r} differs from the cache's {stored.get(key)!r}"
    if index.get("skipped") and not request["skip_bad"]:
        return "the cache left out unreadable files, and skip_bad is off"
    return None


def _from_index(scan: FolderScan, index: dict, request: dict[str, Any], images: np.ndarray,
                index_file: Path | None, reused: bool, notes: list[str]) -> ImageFolder:
    kept = index["kept"]
    paths = tuple(scan.files[i].path for i in kept)
    labels = np.asarray([scan.files[i].label for i in kept], dtype=np.int64)
    n_train = sum(1 for i in kept if scan.files[i].split == "train")
    resolved = index["resolved"]
    options = {**request, "channels": resolved["channels"], "image_size": list(resolved["image_size"])}
    return ImageFolder(root=scan.root, class_names=scan.class_names, images=images, labels=labels, paths=paths,
                       n_train=n_train, options=options, skipped=tuple(tuple(s) for s in index["skipped"]),
                       notes=tuple(notes), cache_path=index_file, cache_reused=reused, layout=scan.layout)


def load_image_folder(root: str | os.PathLike, channels: int | None = None,
                      image_size: str | Sequence[int] | None = None, resize: str = "resize",
                      test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = 0, skip_bad: bool = False,
                      cache: bool = True, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True, workers: int | None = None) -> ImageFolder:
    """Read an image folder (layouts: module docstring) into (N, H, W, C) uint8 arrays.

    channels: 1 or 3, or None for what most images have. image_size: (H, W) or 'HxW', or None
    for the size all images share. resize: 'resize' (stretch) or 'crop' (centre crop of the
    target's aspect ratio, then scale); see cnn_gpu.data.images. test_fraction, split_seed: how
    the test split is cut when there is no test/ folder. skip_bad: leave out files that cannot be
    decoded (counted in .skipped and the notes) instead of raising ImageDecodeError. cache: decode
    once into a memory-mapped cache (cache_dir: where; default beside the data) and reuse it;
    False decodes into memory every time. progress: tqdm bars while reading. workers: decoding
    threads (default_workers(); 1 decodes in this thread); the result does not depend on it.

    Raises DatasetNotFoundError when root is not a folder, ImageDecodeError (a ValueError) naming
    the first unreadable file unless skip_bad, and ValueError for a folder without images, sizes
    that differ while image_size is None, or a class in test/ that train/ lacks.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (what most images have), got {channels!r}")
    size = parse_image_size(image_size)
    check_resize_mode(resize)
    scan = scan_image_folder(root, test_fraction, split_seed)
    request = _request(channels, size, resize, test_fraction, split_seed, skip_bad)
    files = sorted([f.path, f.size, f.mtime_ns] for f in scan.files)  # what is there, whatever the split
    notes = list(scan.notes)
    directory = stem = None
    if cache:
        directory, stem = cache_location(scan.root, cache_dir)
        try:
            index = cache_files.read_index(directory, stem)
            why = _mismatch(index, request, files)
            if why is not None:
                raise cache_files.CacheInvalid(why)
            images = cache_files.open_npy(directory / index["data"], tuple(index["shape"]))
            index_file = cache_files.index_path(directory, stem)
            return _from_index(scan, index, request, images, index_file, True, notes + list(index["build_notes"])
                               + [f"read from the cache {index_file}"])
        except cache_files.CacheInvalid as exc:
            if cache_files.index_path(directory, stem).exists():
                notes.append(f"cache rebuilt: {exc}")
        except (KeyError, TypeError, IndexError) as exc:  # an index of this version but not of this shape
            notes.append(f"cache rebuilt: its index is malformed ({type(exc).__name__}: {exc})")
    require_pillow()
    workers = default_workers() if workers is None else max(1, int(workers))
    if directory is not None and cache_dir is None and not cache_files.writable_directory(directory):
        directory, stem = user_cache_dir(IMAGE_FOLDER), _stem_for(scan.root)  # readable beside the data, not writable
    skipped: dict[str, str] = {}
    build_notes: list[str] = []
    if channels is None or size is None:
        channels, size = _resolve(scan, channels, size, skip_bad, progress, skipped, build_notes)
    todo = [i for i, f in enumerate(scan.files) if f.path not in skipped]
    kept: list[int] = []
    changes: Counter[str] = Counter()

    def decode_one(i: int) -> DecodedImage | ImageDecodeError:  # runs in a worker thread
        try:
            return decode_image(scan.root / scan.files[i].path, channels, size, resize, catch_warnings=False)
        except ImageDecodeError as exc:
            return exc

    def decoded() -> Iterator[np.ndarray]:
        """The pixels of each readable file in stored order, decoded by `workers` threads."""
        with _progress(len(todo), f"decoding {len(todo)} images", progress) as bar, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the workers' warnings land here, never on the console
            for i, image in zip(todo, _ordered_map(decode_one, todo, workers)):
                if bar is not None:
                    bar.update(1)
                if isinstance(image, ImageDecodeError):
                    if not skip_bad:
                        raise ImageDecodeError(f"{image}; {SKIP_HINT}") from image
                    skipped[scan.files[i].path] = str(image)
                    continue
                changes.update(image.notes)
                kept.append(i)
                yield image.pixels
        changes.update(warning_note(w) for w in caught)

    item_shape = (*size, channels)
    if directory is not None:
        data_name = cache_files.new_data_name(stem)
        count = cache_files.write_npy_stream(directory / data_name, item_shape, decoded())
    else:
        buffer = np.empty((len(todo), *item_shape), dtype=np.uint8)
        count = 0
        for count, pixels in enumerate(decoded(), start=1):
            buffer[count - 1] = pixels
        images = buffer[:count]
    build_notes += _summarize(changes)
    if skipped:
        first = next(iter(skipped.values()))
        build_notes.append(f"skipped {len(skipped)} unreadable file(s) (skip_bad); the first: {first}")
    if not kept:
        raise ValueError(f"none of the {len(scan.files)} image files in {scan.root} could be read")
    index = {"request": request, "resolved": {"channels": channels, "image_size": list(size)}, "files": files,
             "split_is_cut": scan.split_is_cut, "kept": kept, "skipped": sorted(skipped.items()),
             "shape": [count, *item_shape], "build_notes": build_notes}
    index_file = None
    if directory is not None:
        index["data"] = data_name
        index_file = cache_files.write_index(directory, stem, index)
        cache_files.remove_stale_files(directory, stem, keep=data_name)
        images = cache_files.open_npy(directory / data_name, tuple(index["shape"]))
        build_notes.append(f"decoded into the cache {index_file}")
    return _from_index(scan, index, request, images, index_file, False, notes + build_notes)
