"""Cooperative stopping: long work checks a ``threading.Event`` between steps and raises Stopped.

The node's worker shares one event with its Segmenter; setting it at shutdown makes text encoding
(between prompt batches) and inference (between stages and batch groups) give up within one step
instead of running a 1000-class vocabulary or a batch of frames to the end.
"""

from __future__ import annotations

import threading


class Stopped(Exception):
    """The work was abandoned because the stop event is set; nothing was changed by it."""


def check_stop(stop: threading.Event | None, before: str) -> None:
    """Raise Stopped when ``stop`` is set; ``before`` names the step that would come next."""
    if stop is not None and stop.is_set():
        raise Stopped(f"stop requested before {before}")


class AnyEvent:
    """Set when any of its events is set: what ``check_stop`` reads (``is_set``), e.g. the
    node's shutdown or the supersession of the change being encoded. Read-only: set the events
    themselves."""

    def __init__(self, *events: threading.Event | AnyEvent | None) -> None:
        self.events = tuple(event for event in events if event is not None)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)
