"""KV-slot allocator: hands out row indices of the token-slot KV pool (page size 1).

Slots are 1..num_slots; slot 0 is a reserved padding/dummy row (the pool has
num_slots + 1 rows) that is never handed out, so padded positions can write to
it harmlessly.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


class SlotAllocator:
    """Free-slot stack with O(n) vectorised alloc/free (hot path: every decode step)."""

    __slots__ = ("num_slots", "_stack", "_top", "_in_use", "_scratch")

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        # Free slots live in _stack[:_top]; the top is the end. Initialised
        # descending so the first allocations return 1, 2, 3, ... (nicer to debug).
        self._stack: NDArray[np.int32] = np.arange(num_slots, 0, -1, dtype=np.int32)
        self._top = num_slots
        # Bitmap for cheap double-free / foreign-slot detection. Row 0 is
        # never in use (it is rejected by the range check instead).
        self._in_use = np.zeros(num_slots + 1, dtype=bool)
        # Scratch used to detect duplicates inside one free() call in O(n).
        self._scratch = np.zeros(num_slots + 1, dtype=np.int64)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_slots - self._top

    def alloc(self, n: int) -> NDArray[np.int32] | None:
        """n distinct free slots (int32), or None if fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self._top:
            return None
        top = self._top
        # Reverse so freshly initialised pools hand out ascending slots; copy so
        # later pushes onto the stack cannot alias the caller's array.
        out: NDArray[np.int32] = self._stack[top - n : top][::-1].copy()
        self._top = top - n
        self._in_use[out] = True
        return out

    def free(self, slots: np.ndarray | list[int]) -> None:
        """Return slots to the pool. Raises (without changing state) on a slot
        that is out of range, not currently allocated, or repeated in `slots`."""
        arr = np.asarray(slots)
        if arr.size == 0:
            return
        arr = arr.ravel()
        if arr.dtype.kind not in "iu":
            raise TypeError(f"slots must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 1 or hi > self.num_slots:
            raise ValueError(f"slot out of range [1, {self.num_slots}]: min={lo} max={hi}")
        if not self._in_use[arr].all():
            bad = arr[~self._in_use[arr]]
            raise ValueError(f"double free / freeing unallocated slots: {bad[:8].tolist()}")
        # Duplicates within this call: with repeated indices only one write
        # survives, so some position will not read back its own index.
        n = arr.size
        pos = np.arange(n)
        self._scratch[arr] = pos
        if not (self._scratch[arr] == pos).all():
            raise ValueError("duplicate slots in a single free() call")
        self._in_use[arr] = False
        self._stack[self._top : self._top + n] = arr
        self._top += n

    def is_allocated(self, slots: np.ndarray | list[int]) -> np.ndarray:
        """Boolean mask: which of `slots` are currently handed out (for checks/tests)."""
        arr = np.asarray(slots, dtype=np.int64)
        return self._in_use[arr]

    def reset(self) -> None:
        """Mark every slot free again (e.g. after dropping all requests and the cache)."""
        self._stack[:] = np.arange(self.num_slots, 0, -1, dtype=np.int32)
        self._top = self.num_slots
        self._in_use[:] = False
