"""How a kernel compiled for one shape is named, and how a loop compiled around it calls it.

    tiles = specialized(tiles12, KERNEL_JIT)                      # a closure over (c, o, s, taps)
    loop = specialized(forward_chunks, KERNEL=_kernel(c, o, s))    # forward_chunks calls KERNEL(...)

The direct convolution's kernels, and the loops around them, are closures compiled for the
constants they capture (channel counts, stride, taps). Two things go wrong with a closure that
Numba compiles as it comes, each found the hard way:

- Numba's disk cache keys a closure on a pickle of the values it captures, and a compiled
  function (a Numba dispatcher) pickles with an id drawn anew in every process: a loop that
  captured the kernel it calls missed the cache in every new process and was compiled again,
  seconds a shape. specialized() binds the kernels as globals of the loop's own instead (the
  cache keys on the loop's code and its captured values, not its globals).
- Numba names a compiled function's symbol after its qualified name, a serial number counted in
  each process and its argument types. A loop carries the code of the kernels it calls, so two
  processes that compiled the same steps for other channels cached loops whose kernels bore the
  same symbols, and a third process that loaded both linked both loops to one of the kernels: the
  other shape's weights read with the wrong strides (a wrong result or a heap overwritten).

So specialized() names each closure after what it was made of: the constants it captured and the
names of the kernels bound to it (each named so in turn). Distinct kernels get distinct names, in
their symbols and in their cache entries (kept in a file per name); the same kernel gets the same
name in every process, and its cache entry is found again.

KERNEL_JIT compiles a kernel without a disk cache of its own: a loop that calls it links the
kernel's code into its own and emits machine code for the whole, which the loop's cache keeps,
so an entry of the kernel's own would be emitted and written for nothing. (Numba's inline="always",
which would copy the kernel into the loop before typing, makes the compile slower: it deep-copies
the kernels' long unrolled bodies.)
"""
from __future__ import annotations

import hashlib
import types
from typing import Any, Callable

import numba

JIT = numba.njit(cache=True, nogil=True, boundscheck=False)  # what Python calls
KERNEL_JIT = numba.njit(nogil=True, boundscheck=False)  # what compiled loops call


def specialized(fn: Callable[..., Any], jit: Callable[[Callable[..., Any]], Any] = JIT, **kernels: Any) -> Any:
    """fn (a closure over constants) compiled by jit, named after those constants and after the
    kernels it calls: each name in kernels is a global name in fn's code, bound to that compiled
    function for fn alone."""
    names = dict(fn.__globals__)
    names.update(kernels)
    named = types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    named.__module__, named.__doc__ = fn.__module__, fn.__doc__
    named.__qualname__ = f"{fn.__qualname__}[{_identity(fn, kernels)}]"
    return jit(named)


def _identity(fn: Callable[..., Any], kernels: dict[str, Any]) -> str:
    """A name for what fn is made of, the same in every process: the values it captured, and each
    kernel's module and name (which holds the kernel's own constants, when specialized() made it)."""
    captured = tuple(cell.cell_contents for cell in fn.__closure__ or ())
    calls = tuple((name, kernels[name].py_func.__module__, kernels[name].py_func.__qualname__) for name in sorted(kernels))
    return hashlib.sha256(repr((captured, calls)).encode()).hexdigest()[:16]
