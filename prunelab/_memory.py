"""Peak memory of a stretch of work: the process's resident-set high-water mark, reset-able.

On Linux the kernel keeps the peak resident set size (``VmHWM`` in ``/proc/self/status``) and
lets a process reset it to the current size (writing ``5`` to ``/proc/self/clear_refs``,
Linux ≥ 4.0). :class:`PeakMemory` resets it at the start of a stretch and reads it at the end,
so each stretch (one layer's statistics and solve) gets its own peak: every byte the process
held at once — the model, cached activations, statistics, the allocator's slack — not only
the tensors a method allocated. Where the reset is not possible the high-water mark is the
whole process's so far (monotonic; ``resettable`` is False); without ``/proc`` it is
``resource.getrusage``'s ``ru_maxrss``, and None where neither exists.
"""

from __future__ import annotations

import re
import sys

_STATUS = "/proc/self/status"
_CLEAR = "/proc/self/clear_refs"


def _read_status(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            found = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        found = None
    return int(found.group(1)) * 1024 if found else None


def resident() -> int | None:
    """Bytes resident now (``VmRSS``), or None where the platform does not say."""
    return _read_status("VmRSS")


def high_water() -> int | None:
    """The process's peak resident bytes since start or the last reset."""
    value = _read_status("VmHWM")
    if value is not None:
        return value
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def reset_high_water() -> bool:
    """Reset the peak to the current resident size; False where the platform cannot."""
    try:
        with open(_CLEAR, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak``: the resident high-water mark of the block
    (of the process so far where it cannot be reset, see ``resettable``). ``overall`` is the
    highest peak seen by every instance that shares the same ``tracker`` dict, so that resets
    between stretches do not lose the whole run's peak."""

    def __init__(self, tracker: dict | None = None):
        self.tracker = tracker if tracker is not None else {}
        self.peak: int | None = None
        self.resettable = False

    def __enter__(self):
        before = high_water()
        if before is not None:  # the peak of the stretch that ends here, before resetting it
            self.tracker["overall"] = max(self.tracker.get("overall", 0), before)
        self.resettable = reset_high_water()
        return self

    def __exit__(self, *exc):
        self.peak = high_water()
        if self.peak is not None:
            self.tracker["overall"] = max(self.tracker.get("overall", 0), self.peak)
