"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number, one 4-byte size per dimension, then the
elements in C order. All numbers are big-endian.

    magic = 0x00 0x00 <type code> <number of dims>
    dims  = ndims x uint32
    data  = prod(dims) elements of the type

A file may be gzip-compressed; that is told by its first two bytes (1f 8b), never by its
name, because copies get renamed and recompressed on their way around.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"

# The standard IDX element types: type code -> big-endian NumPy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),  # unsigned byte
    0x09: np.dtype(">i1"),  # signed byte
    0x0B: np.dtype(">i2"),  # short
    0x0C: np.dtype(">i4"),  # int
    0x0D: np.dtype(">f4"),  # float
    0x0E: np.dtype(">f8"),  # double
}
_TYPE_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it starts with the gzip magic."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:  # the stream stops before its end marker
        raise ValueError(f"{path}: truncated gzip stream ({len(raw)} compressed bytes; "
                         f"the file was cut short, e.g. by an interrupted download): {exc}") from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise ValueError(f"{path}: corrupt gzip stream: {exc}") from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (raw or gzip) into an array of its shape, in native byte order.

    Returns: an array of shape dims (e.g. (N, 28, 28) uint8 for MNIST images, (N,) uint8 for labels).
    Raises ValueError naming the file and what was expected vs found when the magic number,
    type code, dimensions or payload length are wrong (a truncated or padded file included).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file: expected a 4-byte magic number, found {len(data)} bytes")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"{path}: not an IDX file: expected magic to start with bytes 00 00, "
                         f"found {data[:4].hex(' ')}")
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX element type code 0x{type_code:02X}; expected one of {known}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions; expected at least 1")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dims need {header_len} header bytes, "
                         f"found {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        what = "truncated payload" if found < expected else "trailing bytes after the payload"
        raise ValueError(f"{path}: {what}: dims {dims} of {dtype.name} need {expected} bytes "
                         f"after the {header_len}-byte header, found {found}")
    # astype copies into native byte order, so the result is writable and owns its memory.
    array = np.frombuffer(data, dtype=dtype, offset=header_len).astype(dtype.newbyteorder("="))
    return array.reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write an array as an IDX file; gzip it when compress is True (None: when the name ends in .gz).

    array: any shape with 1 to 255 dims, each under 2**32, of dtype uint8, int8, int16, int32,
    float32 or float64. Returns the path written.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _TYPE_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of "
                         f"{sorted(str(d) for d in _TYPE_CODES)}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX stores 1 to 255 dims, got an array of {array.ndim}")
    type_code = _TYPE_CODES[native]
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=IDX_DTYPES[type_code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    content = header + payload
    if compress:
        content = gzip.compress(content)
    path.write_bytes(content)
    return path
