"""Tests of downloading (cnn_gpu/data/download.py and download_dataset/load_dataset) against
a local HTTP server on 127.0.0.1 that the tests start and stop: good files, a bad checksum,
a connection that breaks off midway, a stalled server, and mirror fallback. After every
failure the destination must hold no partial or unverified file."""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data import DATASETS, DatasetNotFoundError, DownloadError, download_dataset, load_dataset
from cnn_gpu.data import download as download_module
from cnn_gpu.data.datasets import STANDARD_FILES, user_cache_dir
from cnn_gpu.data.download import download_file
from tests.data_fixtures import LocalServer, isolate, running_server, write_split


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    with running_server() as server:
        yield server


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def listing(directory: Path) -> list[str]:
    """Every file in directory, hidden temporary files included."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_good_file(tmp_path: Path, local_server) -> None:
    body = bytes(range(256)) * 1000
    local_server.serve("f.gz", body)
    dest = download_file(local_server.url("f.gz"), tmp_path / "out" / "f.gz", md5=md5(body), progress=False)
    assert dest.read_bytes() == body
    assert listing(tmp_path / "out") == ["f.gz"]


def test_bad_checksum_leaves_nothing(tmp_path: Path, local_server) -> None:
    local_server.serve("f.gz", b"not what was promised")
    with pytest.raises(DownloadError, match=r"md5 mismatch: expected 0{32}, got"):
        download_file(local_server.url("f.gz"), tmp_path / "f.gz", md5="0" * 32, progress=False)
    assert listing(tmp_path) == []


def test_connection_that_breaks_off_midway_leaves_nothing(tmp_path: Path, local_server) -> None:
    body = b"x" * 100_000
    local_server.serve("f.gz", body, sent=40_000)  # Content-Length says 100000, then it closes
    with pytest.raises(DownloadError, match="connection closed after 40000 of 100000 bytes"):
        download_file(local_server.url("f.gz"), tmp_path / "f.gz", md5=None, progress=False)
    assert listing(tmp_path) == []


def test_stalled_server_times_out(tmp_path: Path, local_server) -> None:
    local_server.serve("f.gz", b"x" * 10, stall=True)
    with pytest.raises(DownloadError, match="timed out"):
        download_file(local_server.url("f.gz"), tmp_path / "f.gz", timeout=0.3, progress=False)
    assert listing(tmp_path) == []


def test_http_error(tmp_path: Path, local_server) -> None:
    with pytest.raises(DownloadError, match="404"):
        download_file(local_server.url("missing.gz"), tmp_path / "f.gz", progress=False)
    assert listing(tmp_path) == []


def test_interrupt_mid_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(url, out, timeout, progress, name):
        out.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(download_module, "_stream_to", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_file("http://127.0.0.1:1/f.gz", tmp_path / "f.gz")
    assert listing(tmp_path) == []


def test_progress_without_tqdm_prints_one_line(tmp_path: Path, local_server, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    local_server.serve("f.gz", b"y" * 300_000)
    download_file(local_server.url("f.gz"), tmp_path / "f.gz", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Downloading http://127.0.0.1" in captured.err
    download_file(local_server.url("f.gz"), tmp_path / "g.gz", progress=False)
    assert capsys.readouterr() == ("", "")


def _serve_split(server: LocalServer, tmp_path: Path, split: str, n: int,
                 prefix: str = "") -> tuple[dict[str, str], tuple[np.ndarray, np.ndarray]]:
    """Serve a split's two .gz files under /prefix; return their md5 sums by file name."""
    arrays = write_split(tmp_path / "served", n, split)
    sums = {}
    for name in STANDARD_FILES[split]:
        body = (tmp_path / "served" / name).read_bytes()
        server.serve(prefix + name, body)
        sums[name] = md5(body)
    return sums, arrays


def test_download_dataset_falls_back_to_the_next_mirror(tmp_path: Path, local_server) -> None:
    sums, _ = _serve_split(local_server, tmp_path, "test", 4, prefix="good/")
    local_server.serve("bad/t10k-images-idx3-ubyte.gz", b"corrupt")
    mirrors = [local_server.url("bad/"), local_server.url("empty/"), local_server.url("good/")]
    dest = download_dataset("mnist", tmp_path / "cache", splits=["test"], md5=sums, mirrors=mirrors, progress=False)
    assert listing(dest) == sorted(STANDARD_FILES["test"])


def test_download_dataset_error_names_every_url(tmp_path: Path, local_server) -> None:
    mirrors = [local_server.url("a/"), local_server.url("b/")]
    with pytest.raises(DownloadError) as info:
        download_dataset("mnist", tmp_path / "cache", mirrors=mirrors, progress=False)
    assert all(m + "train-images-idx3-ubyte.gz" in str(info.value) for m in mirrors)
    assert listing(tmp_path / "cache") == []


def test_load_dataset_downloads_into_the_cache(tmp_path: Path, local_server, monkeypatch) -> None:
    """The md5 sums and mirror are set in a copy of the registry, as for the real datasets."""
    sums, (images, labels) = _serve_split(local_server, tmp_path, "train", 6)
    monkeypatch.setitem(DATASETS, "mnist", replace(DATASETS["mnist"], md5=sums, mirrors=(local_server.url(),)))
    ds = load_dataset("mnist", "train", progress=False)
    cache = user_cache_dir("mnist")
    assert ds.source == cache and str(cache).startswith(str(tmp_path))
    assert listing(cache) == sorted(STANDARD_FILES["train"])
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    local_server.clear()  # the second load must come from the cache
    assert len(load_dataset("mnist", "train", progress=False)) == 6


def test_load_dataset_with_a_bad_checksum_leaves_no_file_in_the_cache(tmp_path: Path, local_server) -> None:
    sums, _ = _serve_split(local_server, tmp_path, "train", 6)
    sums["train-labels-idx1-ubyte.gz"] = "f" * 32
    with pytest.raises(DatasetNotFoundError, match="md5 mismatch"):
        load_dataset("mnist", "train", mirrors=[local_server.url()], md5=sums, progress=False)
    # The images file was good and is kept (it parses); the bad labels file is not there.
    assert listing(user_cache_dir("mnist")) == ["train-images-idx3-ubyte.gz"]
