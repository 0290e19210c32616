"""How a compiled loop made for one shape calls the kernels made for that shape.

    loop = calling(forward_chunks, KERNEL=_kernel(c, o, s))   # forward_chunks calls KERNEL(...)

The direct convolution's kernels, and the loops around them, are closures compiled for the
constants they capture (channel counts, stride, taps). Numba's disk cache keys a closure on a
pickle of the values it captures, and a compiled function (a Numba dispatcher) pickles with an
id drawn anew in every process: a loop that captured the kernel it calls missed the cache in
every new process and was compiled again, seconds a shape. calling() binds the kernels as globals
of the loop's own instead (the cache keys on the loop's code and its captured constants, not its
globals), and names the loop after them (the cache keeps each name's entries in a file of its
own), so that each set of kernels has its own cache entry, found again by the next process.

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


def calling(fn: Callable[..., Any], jit: Callable[[Callable[..., Any]], Any] = JIT, **kernels: Any) -> Any:
    """fn compiled by jit, with each name in kernels (a global name that fn calls) bound to that
    compiled function; fn's captured constants stay its closure."""
    names = dict(fn.__globals__)
    names.update(kernels)
    bound = types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    bound.__module__, bound.__doc__ = fn.__module__, fn.__doc__
    bound.__qualname__ = f"{fn.__qualname__}[{_identity(kernels)}]"
    return jit(bound)


def _identity(kernels: dict[str, Any]) -> str:
    """A name for these kernels, the same in every process: each one's module, name (a bound loop's
    holds its own kernels' identity) and the constants it captured."""
    described = []
    for name in sorted(kernels):
        function = kernels[name].py_func
        captured = tuple(cell.cell_contents for cell in function.__closure__ or ())
        described.append((name, function.__module__, function.__qualname__, captured))
    return hashlib.sha256(repr(described).encode()).hexdigest()[:16]
