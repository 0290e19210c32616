"""A per-epoch progress bar: tqdm when it is installed and wanted, else nothing (fit() prints
one line per epoch either way)."""
from __future__ import annotations

from typing import Any


def tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class ProgressBar:
    """with ProgressBar(total_steps, "epoch 1/15") as bar: bar.update(n, loss=..., acc=..., img_s=...)"""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self._bar: Any = None
        if enabled and tqdm_available():
            from tqdm.auto import tqdm
            # leave=False: the epoch's summary line replaces the bar when it ends.
            self._bar = tqdm(total=total, desc=description, unit="batch", leave=False, dynamic_ncols=True)

    def note(self, text: str) -> None:
        """Text in place of the figures until the next update (what the bar waits for)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def update(self, steps: int, loss: float, acc: float, img_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", img_s=f"{img_s:.0f}", refresh=False)
            self._bar.update(steps)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
