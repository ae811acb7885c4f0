"""Pair colour frames with depth frames by header stamp, exact or approximate.

message_filters (ExactTime / ApproximateTimeSynchronizer) has no wheel on PyPI, so this is the
rule of the Python message_filters ApproximateTimeSynchronizer, written for two inputs: each
input keeps its newest ``queue_size`` messages by stamp; a message that arrives is paired with
the queued message of the other input whose stamp is closest to its own, if the two differ by
at most ``slop`` (``slop`` 0: equal stamps only, as ExactTime); both leave their queues, the
older unpaired ones stay until newer ones push them out (oldest stamp first).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

First = TypeVar("First")
Second = TypeVar("Second")


def stamp_ns(header: Any) -> int:
    """A std_msgs/Header's stamp in integer nanoseconds (exact: no float rounding)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


class StampPairer(Generic[First, Second]):
    """Pairs items of two inputs (``first``: colour, ``second``: depth) by stamp.

    ``slop`` in seconds (>= 0), ``queue_size`` >= 1 items kept per input. Raises ValueError for
    other values. Not thread-safe: call from one callback group.
    """

    def __init__(self, slop: float = 0.0, queue_size: int = 5) -> None:
        if not slop >= 0.0:
            raise ValueError(f"slop must be >= 0 seconds, got {slop}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.slop_ns = round(slop * 1e9)
        self.queue_size = queue_size
        self._queues: tuple[dict[int, Any], dict[int, Any]] = ({}, {})

    def add_first(self, stamp: int, item: First) -> tuple[First, Second] | None:
        """Queue a colour item with stamp (ns); the (colour, depth) pair it completes, or None."""
        return self._add(0, stamp, item)

    def add_second(self, stamp: int, item: Second) -> tuple[First, Second] | None:
        """Queue a depth item with stamp (ns); the (colour, depth) pair it completes, or None."""
        return self._add(1, stamp, item)

    def match_first(self, stamp: int) -> Second | None:
        """The queued depth item that a colour item with ``stamp`` (ns) pairs with now, taken
        from its queue; None if none is within ``slop``. The colour item is not queued: for a
        colour frame that cannot wait (the node's worker asks once, after segmenting it)."""
        candidates = [s for s in self._queues[1] if abs(s - stamp) <= self.slop_ns]
        if not candidates:
            return None
        return self._queues[1].pop(min(candidates, key=lambda s: (abs(s - stamp), s)))

    def set_slop(self, slop: float) -> None:
        """Change ``slop`` (seconds, >= 0; ValueError otherwise); the queues stay."""
        if not slop >= 0.0:
            raise ValueError(f"slop must be >= 0 seconds, got {slop}")
        self.slop_ns = round(slop * 1e9)

    def pending(self) -> tuple[int, int]:
        """How many colour and depth items wait for a partner."""
        return len(self._queues[0]), len(self._queues[1])

    def clear(self) -> None:
        for queue in self._queues:
            queue.clear()

    def _add(self, index: int, stamp: int, item: Any) -> tuple[Any, Any] | None:
        own, other = self._queues[index], self._queues[1 - index]
        own[stamp] = item  # a repeated stamp replaces the older item
        while len(own) > self.queue_size:
            del own[min(own)]  # the oldest stamp leaves, as in message_filters
        if stamp not in own:  # older than every queued item of a full queue
            return None
        candidates = [s for s in other if abs(s - stamp) <= self.slop_ns]
        if not candidates:
            return None
        best = min(candidates, key=lambda s: (abs(s - stamp), s))
        mine, theirs = own.pop(stamp), other.pop(best)
        return (mine, theirs) if index == 0 else (theirs, mine)
