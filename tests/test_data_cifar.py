"""Tests of cnn_gpu/data/cifar.py on files generated in the exact binary format of CIFAR-10 and
CIFAR-100 (the real ones cannot be downloaded here): planar records whose every pixel value
depends differently on the image, row, column and channel (tests/data_fixtures.py cifar_pixel),
so a wrong reshape, a transpose or a channel swap fails; archives and extracted folders both;
truncated and foreign files; the search order, the offline error and an md5-checked download."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data import DATASETS, DatasetNotFoundError, load_dataset
from cnn_gpu.data.cifar import find_cifar, parse_records
from cnn_gpu.data.datasets import user_cache_dir
from tests.data_fixtures import cifar_record_bytes, expected_cifar_images, isolate, refused_url, running_server

# Per file of the generated CIFAR-10: how many records. Small, and different, so that the order of
# the five training files shows in the result.
CIFAR10_COUNTS = {"data_batch_1.bin": 3, "data_batch_2.bin": 2, "data_batch_3.bin": 1, "data_batch_4.bin": 2,
                  "data_batch_5.bin": 1, "test_batch.bin": 4}


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


def cifar10_files() -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    """file name -> (its bytes, the images and labels it holds). Image numbers run on across files."""
    files, first = {}, 0
    for name, count in CIFAR10_COUNTS.items():
        labels = [((first + k) * 3) % 10 for k in range(count)]
        files[name] = (cifar_record_bytes(first, count, [(lab,) for lab in labels]),
                       expected_cifar_images(first, count), np.array(labels))
        first += count
    return files


def cifar100_files() -> dict[str, tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
    """file name -> (bytes, images, coarse labels, fine labels)."""
    files, first = {}, 0
    for name, count in (("train.bin", 5), ("test.bin", 3)):
        coarse = [(first + k) % 20 for k in range(count)]
        fine = [(first + k) * 17 % 100 for k in range(count)]
        files[name] = (cifar_record_bytes(first, count, list(zip(coarse, fine))), expected_cifar_images(first, count),
                       np.array(coarse), np.array(fine))
        first += count
    return files


def write_folder(directory: Path, contents: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return directory


def archive_bytes(folder: str, contents: dict[str, bytes], gz: bool = True) -> bytes:
    """A .tar(.gz) holding folder/<name> for each file, as the distributions are packed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for name, data in {"batches.meta.txt": b"airplane\n", **contents}.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_parse_records_is_planar_row_major() -> None:
    data = cifar_record_bytes(0, 2, [(7,), (1,)])
    images, labels = parse_records(data, 1, "x.bin")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
    np.testing.assert_array_equal(images, expected_cifar_images(0, 2))
    np.testing.assert_array_equal(labels[:, 0], [7, 1])
    # The same bytes read by hand: record 1's green plane starts 1 + 1024 bytes into it.
    record = 3073
    green = np.frombuffer(data[record + 1 + 1024:record + 1 + 2048], np.uint8).reshape(32, 32)
    np.testing.assert_array_equal(images[1, :, :, 1], green)
    assert images[1, 0, 1, 2] == data[record + 1 + 2048 + 1]  # blue, row 0, column 1


@pytest.mark.parametrize("as_given", ["extracted folder", "folder's parent", "archive", "archive's dir",
                                      "tar", "env var"])
def test_cifar10_from_every_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_given: str) -> None:
    files = cifar10_files()
    contents = {name: f[0] for name, f in files.items()}
    if as_given in ("extracted folder", "folder's parent", "env var"):
        folder = write_folder(tmp_path / "dl" / "cifar-10-batches-bin", contents)
        data_dir = folder if as_given == "extracted folder" else folder.parent
    else:
        gz = as_given != "tar"
        name = "cifar-10-binary.tar.gz" if gz else "cifar-10-binary.tar"
        archive = tmp_path / "dl" / name
        archive.parent.mkdir()
        archive.write_bytes(archive_bytes("cifar-10-batches-bin", contents, gz=gz))
        data_dir = archive if as_given == "archive" else archive.parent
    if as_given == "env var":
        monkeypatch.setenv("CNN_GPU_DATA", str(data_dir))
        data_dir = None
    train = load_dataset("cifar10", "train", data_dir=data_dir, download=False)
    test = load_dataset("cifar-10", "test", data_dir=data_dir, download=False)
    order = [f"data_batch_{i}.bin" for i in range(1, 6)]
    np.testing.assert_array_equal(train.images, np.concatenate([files[n][1] for n in order]))
    np.testing.assert_array_equal(train.labels, np.concatenate([files[n][2] for n in order]))
    np.testing.assert_array_equal(test.images, files["test_batch.bin"][1])
    np.testing.assert_array_equal(test.labels, files["test_batch.bin"][2])
    assert train.labels.dtype == np.int64 and train.images.shape == (9, 32, 32, 3)
    assert train.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                 "truck")
    assert train.name == "cifar10" and train.options == {}


@pytest.mark.parametrize("packed", [True, False])
def test_cifar100_fine_and_coarse(tmp_path: Path, packed: bool) -> None:
    files = cifar100_files()
    contents = {name: f[0] for name, f in files.items()}
    if packed:
        (tmp_path / "cifar-100-binary.tar.gz").write_bytes(archive_bytes("cifar-100-binary", contents))
    else:
        write_folder(tmp_path / "cifar-100-binary", contents)
    for split, name in (("train", "train.bin"), ("test", "test.bin")):
        fine = load_dataset("cifar100", split, data_dir=tmp_path, download=False)
        coarse = load_dataset("cifar100", split, data_dir=tmp_path, download=False, label_mode="coarse")
        np.testing.assert_array_equal(fine.images, files[name][1])
        np.testing.assert_array_equal(coarse.images, files[name][1])
        np.testing.assert_array_equal(coarse.labels, files[name][2])
        np.testing.assert_array_equal(fine.labels, files[name][3])
        assert len(fine.class_names) == 100 and fine.class_names[:3] == ("apple", "aquarium_fish", "baby")
        assert fine.class_names[-1] == "worm" and fine.options == {"label_mode": "fine"}
        assert len(coarse.class_names) == 20 and coarse.class_names[0] == "aquatic_mammals"
        assert coarse.class_names[-1] == "vehicles_2" and coarse.options == {"label_mode": "coarse"}
    with pytest.raises(ValueError, match="label_mode must be one of"):
        load_dataset("cifar100", data_dir=tmp_path, download=False, label_mode="super")
    with pytest.raises(ValueError, match="has no coarse labels"):
        load_dataset("cifar10", data_dir=tmp_path, download=False, label_mode="coarse")


def test_a_truncated_record_file(tmp_path: Path) -> None:
    contents = {name: f[0] for name, f in cifar10_files().items()}
    contents["data_batch_2.bin"] = contents["data_batch_2.bin"][:-1000]
    folder = write_folder(tmp_path / "cifar-10-batches-bin", contents)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(folder / "data_batch_2.bin") in message
    assert "is not a whole number of 3073-byte CIFAR-10 records" in message and "truncated" in message
    write_folder(tmp_path / "cifar-10-batches-bin", {"test_batch.bin": b""})
    with pytest.raises(ValueError, match="0 bytes is not a whole number"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


def test_cifar100_records_read_as_cifar10_do_not_fit(tmp_path: Path) -> None:
    """3074-byte records in a CIFAR-10 file: 5 of them are not a whole number of 3073-byte records."""
    data = cifar100_files()["train.bin"][0]
    contents = {name: f[0] for name, f in cifar10_files().items()}
    write_folder(tmp_path / "cifar-10-batches-bin", {**contents, "test_batch.bin": data})
    with pytest.raises(ValueError, match="3073-byte"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


def test_labels_out_of_range(tmp_path: Path) -> None:
    contents = {name: f[0] for name, f in cifar10_files().items()}
    contents["test_batch.bin"] = cifar_record_bytes(0, 2, [(3,), (10,)])
    write_folder(tmp_path / "cifar-10-batches-bin", contents)
    with pytest.raises(ValueError, match=r"labels in byte 0 of each record must be in \[0, 10\), found 10"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    write_folder(tmp_path / "cifar-100-binary", {"test.bin": cifar_record_bytes(0, 1, [(20, 5)])})
    with pytest.raises(ValueError, match=r"\[0, 20\), found 20"):
        load_dataset("cifar100", "test", data_dir=tmp_path, download=False)


def test_a_damaged_archive(tmp_path: Path) -> None:
    contents = {name: f[0] for name, f in cifar10_files().items()}
    whole = archive_bytes("cifar-10-batches-bin", contents)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    assert str(archive) in str(info.value) and "truncated or corrupt archive" in str(info.value)
    archive.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated or corrupt archive"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    archive.write_bytes(archive_bytes("cifar-10-batches-bin", {"test_batch.bin": contents["test_batch.bin"]}))
    with pytest.raises(ValueError, match="the archive holds no data_batch_1.bin"):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)


def test_the_folder_is_preferred_and_a_partial_folder_is_passed_over(tmp_path: Path) -> None:
    contents = {name: f[0] for name, f in cifar10_files().items()}
    write_folder(tmp_path / "cifar-10-batches-bin", {"test_batch.bin": contents["test_batch.bin"]})
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(archive_bytes("cifar-10-batches-bin", contents))
    assert find_cifar("cifar10", "test", tmp_path).kind == "folder"
    assert find_cifar("cifar10", "train", tmp_path).kind == "archive"  # the folder lacks the training files
    assert len(load_dataset("cifar10", "train", data_dir=tmp_path, download=False)) == 9


def test_offline_and_not_found(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"a pickle, never opened")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "cifar-10-binary.tar.gz or its extracted folder cifar-10-batches-bin/" in message
    assert str(tmp_path) in message and "CNN_GPU_DATA" in message and "download=False" in message
    assert "cifar-10-python.tar.gz, is a pickle and never loaded" in message
    with pytest.raises(DatasetNotFoundError) as info:  # download against mirrors that refuse
        load_dataset("cifar100", "test", data_dir=tmp_path, progress=False)
    assert "refused" in str(info.value).lower() and "cifar-100-binary.tar.gz" in str(info.value)
    assert not any(user_cache_dir("cifar100").iterdir())  # nothing partial left behind


def test_download_checks_the_md5_and_falls_back_to_a_mirror(tmp_path: Path) -> None:
    contents = {name: f[0] for name, f in cifar10_files().items()}
    body = archive_bytes("cifar-10-batches-bin", contents)
    md5 = {"cifar-10-binary.tar.gz": hashlib.md5(body).hexdigest()}
    with running_server() as server:
        server.serve("bad/cifar-10-binary.tar.gz", body[:-10] + b"0123456789")  # wrong content
        server.serve("good/cifar-10-binary.tar.gz", body)
        mirrors = (refused_url(), server.url("bad/"), server.url("good/"))
        test = load_dataset("cifar10", "test", mirrors=mirrors, md5=md5, progress=False)
    np.testing.assert_array_equal(test.images, cifar10_files()["test_batch.bin"][1])
    assert test.source == user_cache_dir("cifar10") / "cifar-10-binary.tar.gz"
    assert sorted(p.name for p in user_cache_dir("cifar10").iterdir()) == ["cifar-10-binary.tar.gz"]
    train = load_dataset("cifar10", "train", download=False)  # from the user cache, no network
    assert len(train) == 9


def test_registry_entries() -> None:
    for name, folder, record_files in (("cifar10", "cifar-10-batches-bin", 6), ("cifar100", "cifar-100-binary", 2)):
        spec = DATASETS[name]
        assert spec.format == "cifar" and spec.folder == folder and spec.image_shape == (32, 32, 3)
        assert sum(len(v) for v in spec.files.values()) == record_files
        assert spec.download_names("train") == (spec.archive,) and list(spec.md5) == [spec.archive]
