"""Sequential: a model is a list of layers run in order."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import cpu
from .atomic import atomic_write
from .backend import backend_of, to_device, to_numpy
from .layers import Conv2D, Layer, Parameter, _BatchNorm, _Pool2D

DEVICE_ALIASES = {"cpu": "numpy", "numpy": "numpy", "gpu": "cupy", "cuda": "cupy", "cupy": "cupy"}
# Evaluation on the CPU runs a large batch in slices whose largest activation is about this size,
# so that each layer finds its input still in cache (see Sequential.forward).
EVAL_SLICE_BYTES = 1 << 23


def _folds_into(layer: Layer, after: Layer | None) -> bool:
    """Whether `after` is a batch norm that eval mode can fold into `layer` (a conv or dense layer
    with as many outputs as the batch norm has channels)."""
    outputs = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    return (isinstance(after, _BatchNorm) and hasattr(layer, "infer_folded")
            and outputs == after.num_features)


class Sequential:
    """Layers applied in order. forward(x) -> logits; backward(dlogits) fills every parameter's grad."""

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers = list(layers)
        self.training = True

    def forward(self, x: Any) -> Any:
        """x -> the last layer's output. In training mode, and on the GPU, each layer's forward
        in turn; in eval mode on NumPy, the evaluation path below (slices, folded batch norms,
        no caches), which gives the same numbers up to rounding."""
        if not self.training and not any(layer.training for layer in self.layers) and backend_of(x) == "numpy":
            return self._forward_in_slices(x)
        return self._forward(x)

    def _forward(self, x: Any) -> Any:
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, **self._read_part(i, i + 1, x))
            if not layer.training:
                layer._cache = None  # nothing will backpropagate: free each activation once used
        return x

    def _forward_in_slices(self, x: Any) -> Any:
        """Evaluation on NumPy, slice by slice of the batch. In eval mode every sample's output
        depends on that sample alone, so the slices give the batch's result; and each slice's
        activations (~EVAL_SLICE_BYTES) stay in cache from one layer to the next, where a whole
        batch's would go out to memory and back at every layer. Measured, seed network at batch
        256, one thread: 1.2x with batch norm, no change without; smaller slices lose to call
        overhead, so a batch of up to one slice (64 images here) runs whole."""
        try:
            per_sample = self._largest_activation_bytes(tuple(x.shape[1:]), x.dtype.itemsize)
        except (ValueError, TypeError, IndexError):  # a bad input: let the layers say what is wrong
            return self._infer(x)
        size = max(1, EVAL_SLICE_BYTES // per_sample)
        if x.ndim == 0 or len(x) <= size:
            return self._infer(x)
        size = -(-len(x) // -(-len(x) // size))  # as many slices as needed, of equal size
        first = self._infer(x[:size])
        out = np.empty((len(x), *first.shape[1:]), dtype=first.dtype)
        out[:size] = first
        for start in range(size, len(x), size):
            out[start:start + size] = self._infer(x[start:start + size])
        return out

    def _infer(self, x: Any) -> Any:
        """Evaluation through each layer's infer(); a batch norm right after a conv or dense
        layer is folded into that layer's weights (Conv2D.infer_folded), so it costs nothing."""
        layers, i = self.layers, 0
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if _folds_into(layer, after):
                x = layer.infer_folded(x, *after.eval_scale_shift(), **self._read_part(i, i + 2, x))
                i += 2
            else:
                x = layer.infer(x, **self._read_part(i, i + 1, x))
                i += 1
        return x

    def _read_part(self, i: int, j: int, x: Any) -> dict[str, Any]:
        """{"out_size": (rows, cols)} when layer i is a convolution whose output layer j, a pool,
        reads only in part, so that the convolution computes just that part; else {}. The seed
        network's 2x2 pool reads 10 x 10 of conv2's 11 x 11 outputs. Layer j must read layer i's
        output itself: in training a batch norm between them needs all of it for its statistics."""
        layer, reader = self.layers[i], self.layers[j] if j < len(self.layers) else None
        if not (isinstance(layer, Conv2D) and isinstance(reader, _Pool2D) and layer.padding == (0, 0)
                and getattr(x, "ndim", 0) == 4 and x.shape[3] == layer.in_channels):
            return {}  # not this case, or a bad input that the layer's forward will name
        rows, cols, _ = layer.output_shape(tuple(x.shape[1:]))
        used = reader.input_extent(rows, cols)
        return {"out_size": used} if used != (rows, cols) else {}

    def _largest_activation_bytes(self, sample_shape: tuple[int, ...], itemsize: int) -> int:
        """Bytes of the largest input or output of any layer, for one sample."""
        shape, largest = sample_shape, int(np.prod(sample_shape))
        for layer in self.layers:
            shape = layer.output_shape(shape)
            largest = max(largest, int(np.prod(shape)))
        return largest * itemsize

    __call__ = forward

    def backward(self, dout: Any) -> None:
        """Backpropagate dL/d(output). The input gradient of the first layer is never computed."""
        for i in range(len(self.layers) - 1, -1, -1):
            dout = self.layers[i].backward(dout, need_dx=i > 0)

    def parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.params.values()]

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers) for name, p in layer.params.items()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> "Sequential":
        self.training = mode
        for layer in self.layers:
            layer.training = mode
        return self

    def eval(self) -> "Sequential":
        return self.train(False)

    def to(self, device: str) -> "Sequential":
        """Move every parameter and buffer to 'cpu'/'numpy' or 'gpu'/'cuda'/'cupy'."""
        if device not in DEVICE_ALIASES:
            raise ValueError(f"device must be one of {sorted(DEVICE_ALIASES)}, got {device!r}")
        for layer in self.layers:
            layer.to(DEVICE_ALIASES[device])
        return self

    @property
    def backend(self) -> str:
        """'numpy' or 'cupy': where the parameters live."""
        params = self.parameters()
        return backend_of(params[0].data) if params else "numpy"

    @property
    def dtype(self) -> np.dtype:
        params = self.parameters()
        return params[0].data.dtype if params else np.dtype("float32")

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters())

    def summary(self, input_shape: tuple[int, ...]) -> str:
        """A table of each layer's output shape (per sample) and parameter count."""
        rows = [("layer", "output shape", "params"), ("input", str(tuple(input_shape)), "")]
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
            count = sum(int(np.prod(p.shape)) for p in layer.params.values())
            rows.append((repr(layer), str(shape), f"{count:,}" if count else "0"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {self.num_parameters():,}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "Sequential(\n" + "".join(f"  ({i}) {layer!r}\n" for i, layer in enumerate(self.layers)) + ")"

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter and buffer as NumPy arrays, keyed '<layer index>.<name>'."""
        state = {}
        for i, layer in enumerate(self.layers):
            for name, p in layer.params.items():
                state[f"{i}.{name}"] = to_numpy(p.data).copy()
            for name, value in layer.buffers.items():
                state[f"{i}.{name}"] = to_numpy(value).copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays into the model (onto its device), checking names, shapes and dtypes first.
        On the CPU, subnormal parameter values become zero (see cnn_gpu.cpu.flush_subnormals)."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"state does not match the model: missing {missing or 'nothing'}, "
                             f"unexpected {unexpected or 'nothing'}")
        for key, ref in expected.items():
            value = state[key]
            if tuple(value.shape) != ref.shape or value.dtype != ref.dtype:
                raise ValueError(f"state entry {key!r}: the model expects {ref.dtype} {ref.shape}, "
                                 f"got {value.dtype} {tuple(value.shape)}")
        backend = self.backend
        for i, layer in enumerate(self.layers):
            for name, p in layer.params.items():
                p.data = to_device(np.array(to_numpy(state[f"{i}.{name}"])), backend)
                p.grad = None
                if backend == "numpy":  # e.g. weights trained on a GPU, which keeps subnormals
                    cpu.flush_subnormals(p.data)
            for name in layer.buffers:
                layer.buffers[name] = to_device(np.array(to_numpy(state[f"{i}.{name}"])), backend)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a .npz file atomically: a crash leaves the old file or the new one."""
        save_npz_atomic(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> "Sequential":
        """Load a state written by save() (never unpickles)."""
        self.load_state_dict(load_npz(path))
        return self


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file beside `path`, fsync, then rename over it."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a .npz file, with pickles refused and a clear error for a damaged file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError...
        raise ValueError(f"{path} is not a readable .npz checkpoint (truncated or corrupted?): {exc}") from exc
