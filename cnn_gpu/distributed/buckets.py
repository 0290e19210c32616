"""Parameters and gradients moved between ranks in few flat buffers ("buckets").

A collective costs a fixed latency plus the bytes over the bandwidth; one per parameter would pay
the latency a dozen times a step (the seed network has 8 parameter arrays, a ResNet about 60). So
the arrays are laid end to end, per dtype, in a fixed order (the order of the list, which every
rank builds the same way from the same model), and cut into buckets of at most bucket_bytes:

    arrays  [w0 (3,3,1,32) f32, b0 (32,) f32, ..., running_mean (32,) f64]
    float32 |w0 .........|b0|w1 ..................|b1|...|   -> buckets of <= bucket_bytes each
    float64 |running_mean|...|

A bucket may end inside an array; a Segment says which part of which array sits where. The bound
keeps each message at a size where the link runs at full bandwidth while keeping the buffers (one
more copy of the gradients) from growing with the model into one huge message.

    averager = GradientAverager(comm, model.parameters())   # once; checks every rank's layout
    ...backward...
    averager.average()                                       # every .grad = mean over ranks
    broadcast_arrays(comm, [p.data for p in params] + buffers)  # rank 0's values everywhere
    average_arrays(comm, buffers)                            # every buffer = mean over ranks
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..backend import get_array_module, to_numpy
from .comm import Communicator, DistributedError

DEFAULT_BUCKET_BYTES = 1 << 23  # 8 MiB


class Segment(NamedTuple):
    """Elements [start, stop) of array `index` (flattened, C order) sit at bucket[offset:offset + stop - start]."""

    index: int
    start: int
    stop: int
    offset: int


class Bucket(NamedTuple):
    """One flat buffer: `size` elements of `dtype`, filled by its segments in order."""

    dtype: np.dtype
    size: int
    segments: tuple[Segment, ...]


Layout = Sequence[tuple[tuple[int, ...], Any]]  # (shape, dtype) per array


def layout_of(arrays: Sequence[Any]) -> list[tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of each array."""
    return [(tuple(int(n) for n in a.shape), np.dtype(a.dtype)) for a in arrays]


def plan_buckets(layout: Layout, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """The buckets for arrays of these (shape, dtype): grouped by dtype (in the order each dtype
    first appears), the arrays of a dtype in list order, cut every bucket_bytes // itemsize
    elements (at least one). Empty arrays take no room. The same layout gives the same plan."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    dtypes: list[np.dtype] = []
    for _, dtype in layout:
        if np.dtype(dtype) not in dtypes:
            dtypes.append(np.dtype(dtype))
    buckets: list[Bucket] = []
    for dtype in dtypes:
        capacity = max(1, bucket_bytes // dtype.itemsize)
        segments: list[Segment] = []
        filled = 0
        for index, (shape, array_dtype) in enumerate(layout):
            if np.dtype(array_dtype) != dtype:
                continue
            size, start = int(np.prod(shape, dtype=np.int64)), 0
            while start < size:
                take = min(size - start, capacity - filled)
                segments.append(Segment(index, start, start + take, filled))
                start, filled = start + take, filled + take
                if filled == capacity:
                    buckets.append(Bucket(dtype, filled, tuple(segments)))
                    segments, filled = [], 0
        if segments:
            buckets.append(Bucket(dtype, filled, tuple(segments)))
    return buckets


def pack(bucket: Bucket, flats: Sequence[Any], out: Any) -> Any:
    """Copy the bucket's segments of the flat arrays (None: zeros) into out (bucket.size,)."""
    for seg in bucket.segments:
        part = out[seg.offset:seg.offset + seg.stop - seg.start]
        flat = flats[seg.index]
        if flat is None:
            part[...] = 0
        else:
            part[...] = flat[seg.start:seg.stop]
    return out


def unpack(bucket: Bucket, buffer: Any, flats: Sequence[Any], scale: float = 1.0) -> None:
    """Copy buffer (bucket.size,) back into the bucket's segments of the flat arrays, times
    `scale` (in the same pass: one read of the buffer, one write of the arrays)."""
    xp = get_array_module(buffer)
    factor = buffer.dtype.type(scale)
    for seg in bucket.segments:
        part = buffer[seg.offset:seg.offset + seg.stop - seg.start]
        if scale == 1.0:
            flats[seg.index][seg.start:seg.stop] = part
        else:
            xp.multiply(part, factor, out=flats[seg.index][seg.start:seg.stop])


def _flat_view(a: Any, what: str) -> Any:
    """a as a flat view that writes through to it."""
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous to be written in place, "
                         f"got shape {tuple(a.shape)} strides {tuple(a.strides)}")
    return a.reshape(-1)


def layout_digest(layout: Layout) -> np.ndarray:
    """16 bytes (uint8) that differ, but for a 2**-128 chance, between different layouts."""
    text = ";".join(f"{tuple(shape)}:{np.dtype(dtype).str}" for shape, dtype in layout)
    return np.frombuffer(hashlib.blake2b(text.encode(), digest_size=16).digest(), dtype=np.uint8).copy()


def check_same_layout(comm: Communicator, layout: Layout, what: str) -> None:
    """Raise DistributedError on every rank (no rank is left waiting) unless every rank has the
    same shapes and dtypes, in the same order: ranks that built different models. One allgather."""
    if comm.size == 1:
        return
    digests = comm.allgather(layout_digest(layout))  # (size, 16)
    differ = [r for r in range(comm.size) if not np.array_equal(digests[r], digests[0])]
    if differ:
        raise DistributedError(f"{what}: ranks {differ} hold arrays of other shapes or dtypes than rank 0 "
                               f"({len(layout)} arrays here); every rank must build the same model")


def broadcast_arrays(comm: Communicator, arrays: Sequence[Any], root: int = 0,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Every rank's arrays become root's, in place, in few broadcasts (one per bucket).

    arrays: C-contiguous NumPy or CuPy arrays, of the same shapes and dtypes on every rank (e.g.
    [p.data for p in model.parameters()] plus the batch-norm running statistics), all on one
    backend. Checks the layouts first (check_same_layout).
    """
    if comm.size == 1 or not arrays:
        return
    layout = layout_of(arrays)
    check_same_layout(comm, layout, "broadcast_arrays")
    xp = get_array_module(*arrays)
    flats = [_flat_view(a, f"broadcast_arrays: array {i}") for i, a in enumerate(arrays)]
    for bucket in plan_buckets(layout, bucket_bytes):
        buffer = xp.empty(bucket.size, dtype=bucket.dtype)
        if comm.rank == root:
            pack(bucket, flats, buffer)
        comm.broadcast(buffer, root=root)
        if comm.rank != root:
            unpack(bucket, buffer, flats)


def average_arrays(comm: Communicator, arrays: Sequence[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Every rank's arrays become their mean over ranks, in place, one allreduce per bucket
    (e.g. batch norm's running statistics where each rank normalized its own shard). Floating-
    point, C-contiguous arrays of the same shapes and dtypes on every rank (checked first); with
    one rank nothing happens."""
    if comm.size == 1 or not arrays:
        return
    layout = layout_of(arrays)
    check_same_layout(comm, layout, "average_arrays")
    xp = get_array_module(*arrays)
    flats = [_flat_view(a, f"average_arrays: array {i}") for i, a in enumerate(arrays)]
    for bucket in plan_buckets(layout, bucket_bytes):
        buffer = pack(bucket, flats, xp.empty(bucket.size, dtype=bucket.dtype))
        comm.allreduce_sum(buffer)
        unpack(bucket, buffer, flats, 1.0 / comm.size)


class GradientAverager:
    """Replaces each parameter's .grad with the mean over ranks, one allreduce per bucket.

    params: objects with .data and .grad (cnn_gpu's Parameter), the same list on every rank.
    The buffers are allocated at the first average() on the parameters' backend, and again if
    the model moves. A .grad that is None (a rank without images in this step) counts as zeros;
    afterwards every parameter has a .grad. A .grad that is C-contiguous is written in place,
    any other is replaced by a new array.
    """

    def __init__(self, comm: Communicator, params: Sequence[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.comm = comm
        self.params = list(params)
        self.layout = layout_of([p.data for p in self.params])
        self.buckets = plan_buckets(self.layout, bucket_bytes)
        check_same_layout(comm, self.layout, "GradientAverager")
        self._buffers: list[Any] = []
        self._xp: Any = None

    def average(self) -> None:
        """Every rank's p.grad becomes (1/size) * the sum over ranks of p.grad."""
        self.reduce(1.0 / self.comm.size)

    def reduce(self, scale: float) -> None:
        """Every rank's p.grad becomes scale * the sum over ranks of p.grad. With one rank: only
        the scaling (nothing at all for scale 1)."""
        if self.comm.size == 1 and scale == 1.0:
            return
        xp = get_array_module(*[p.data for p in self.params])
        sources, targets = self._views(xp)
        if xp is not self._xp:
            self._buffers = [xp.empty(b.size, dtype=b.dtype) for b in self.buckets]
            self._xp = xp
        for bucket, buffer in zip(self.buckets, self._buffers):
            pack(bucket, sources, buffer)
            self.comm.allreduce_sum(buffer)
            unpack(bucket, buffer, targets, scale)

    def _views(self, xp: Any) -> tuple[list[Any], list[Any]]:
        """The flat gradients to read (None: zeros), and the flat arrays to write, which are the
        same where .grad can be written in place. A parameter's new .grad is set here."""
        sources, targets = [], []
        for i, (p, (shape, dtype)) in enumerate(zip(self.params, self.layout)):
            g = p.grad
            if g is not None and (tuple(g.shape) != shape or np.dtype(g.dtype) != dtype):
                raise ValueError(f"GradientAverager: parameter {i} is {dtype} {shape} but its gradient is "
                                 f"{g.dtype} {tuple(g.shape)}")
            source = None if g is None else g.reshape(-1)
            if g is None or not g.flags.c_contiguous:
                p.grad = xp.empty(shape, dtype=dtype)
            sources.append(source)
            targets.append(p.grad.reshape(-1))
        return sources, targets


def ranks_agree(comm: Communicator, arrays: Sequence[Any]) -> bool:
    """True on every rank when every rank holds bit-identical arrays (a check, e.g. once an epoch,
    that the replicas have not drifted apart). Hashes on the host; one allgather."""
    digest = hashlib.blake2b(digest_size=16)
    for a in arrays:
        host = np.ascontiguousarray(to_numpy(a))
        digest.update(f"{host.shape}:{host.dtype.str}".encode())
        digest.update(host.tobytes())
    digests = comm.allgather(np.frombuffer(digest.digest(), dtype=np.uint8).copy())
    return bool(all(np.array_equal(digests[r], digests[0]) for r in range(comm.size)))
