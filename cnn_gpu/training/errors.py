"""Errors that end a training run, each saying what to change."""
from __future__ import annotations


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite. Checkpoints written before stay as they were."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


class DeviceOutOfMemory(MemoryError):
    """The device (or host) ran out of memory at the given batch size."""

    def __init__(self, message: str, batch_size: int) -> None:
        super().__init__(message)
        self.batch_size = batch_size


def is_out_of_memory(exc: BaseException) -> bool:
    """True for MemoryError and CuPy's OutOfMemoryError (cupy.cuda.memory.OutOfMemoryError).

    Matched by class name so that CuPy is never imported outside cnn_gpu.backend.
    """
    if isinstance(exc, MemoryError):
        return True
    return any(cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("cupy")
               for cls in type(exc).__mro__)
