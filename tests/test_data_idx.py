"""Tests of cnn_gpu/data/idx.py: round trips, and a clear ValueError for every malformed file."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data.idx import read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("shape", [(5,), (3, 4, 5), (2, 1, 3, 2)])
def test_round_trip(tmp_path: Path, dtype, name: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    read = read_idx(write_idx(tmp_path / name, array))
    assert read.dtype == np.dtype(dtype) and read.shape == shape
    np.testing.assert_array_equal(read, array)
    assert read.flags.writeable and read.dtype.isnative


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_without_suffix = write_idx(tmp_path / "plain-name", array, compress=True)
    raw_with_gz_suffix = write_idx(tmp_path / "looks.gz", array, compress=False)
    assert gz_without_suffix.read_bytes()[:2] == b"\x1f\x8b"
    assert raw_with_gz_suffix.read_bytes()[:2] == b"\x00\x00"
    np.testing.assert_array_equal(read_idx(gz_without_suffix), array)
    np.testing.assert_array_equal(read_idx(raw_with_gz_suffix), array)


def test_big_endian_on_disk(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.idx", np.array([1, 258], dtype=np.int32))
    assert path.read_bytes() == bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 2])


def test_write_rejects_dtypes_idx_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IDX cannot store dtype int64"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=np.int64))


def _valid_bytes() -> bytes:
    """A raw IDX file: 2 x 3 uint8."""
    return bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))


# (what the file holds, a regex the error must contain besides the file name)
MALFORMED = {
    "empty": (b"", r"expected a 4-byte magic number, found 0 bytes"),
    "bad magic": (b"\x01\x02" + _valid_bytes()[2:], r"expected magic to start with bytes 00 00, found 01 02 08 02"),
    "unknown type code": (b"\x00\x00\x07\x02" + _valid_bytes()[4:], r"type code 0x07; expected one of 0x08"),
    "zero dims": (b"\x00\x00\x08\x00", r"0 dimensions"),
    "truncated header": (_valid_bytes()[:9], r"2 dims need 12 header bytes, found 9"),
    "wrong dims": (_valid_bytes()[:11] + b"\x04" + bytes(range(6)), r"truncated payload: dims \(2, 4\)"),
    "truncated payload": (_valid_bytes()[:-1], r"truncated payload: .* need 6 bytes .* found 5"),
    "trailing bytes": (_valid_bytes() + b"\x00", r"trailing bytes after the payload: .* need 6 bytes .* found 7"),
    "truncated gzip": (gzip.compress(_valid_bytes() * 50)[:-10], r"truncated gzip stream"),
    "corrupt gzip": (b"\x1f\x8b" + b"\xff" * 40, r"corrupt gzip stream"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_raise_a_clear_error(tmp_path: Path, case: str) -> None:
    content, message = MALFORMED[case]
    path = tmp_path / "bad-file-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_sanity_of_the_malformed_fixtures(tmp_path: Path) -> None:
    """The valid base of the malformed cases parses, so each case fails for its own reason."""
    path = tmp_path / "good"
    path.write_bytes(_valid_bytes())
    np.testing.assert_array_equal(read_idx(path), np.arange(6, dtype=np.uint8).reshape(2, 3))
    path.write_bytes(gzip.compress(_valid_bytes()))
    assert read_idx(path).shape == (2, 3)
