"""Work arrays reused from one exchange to the next.

A fresh multi-megabyte numpy array is mapped page by page on first touch: measured here,
a fixed-point encode of SmolLM2's 460,800 adapter values spent 5 of its 6 ms faulting in
fresh float64/int64 temporaries, and each keystream or sum paid the same again. Secure mode
therefore writes its temporaries into buffers that stay mapped for the run."""

from __future__ import annotations

import numpy as np


class Scratch:
    """Named arrays, reallocated only when the size or dtype asked for changes. An array
    stays valid until the next request for the same name: callers copy out what they keep."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, count: int, dtype: np.dtype | type) -> np.ndarray:
        wanted = np.dtype(dtype)
        array = self._arrays.get(name)
        if array is None or array.size != count or array.dtype != wanted:
            array = self._arrays[name] = np.empty(count, dtype=wanted)
        return array
