"""Newest-frame buffer (one slot per camera) and the worker thread that drains it.

A camera publishes faster than CLIP segments on most robots. Queueing frames would only add
latency (every result would be older than the last), so the subscription callback overwrites its
camera's slot and a worker thread takes whatever is newest when it is ready for more, as
image_pipeline's camera_calibration does. The executor thread therefore never waits on inference,
and parameter or service calls are answered while a frame is being segmented.

The worker takes every filled slot at once: frames of several cameras that arrived while it was
busy are segmented together (one forward pass when they share a size), so a second camera costs
little more GPU time than the first. An idle worker takes a lone frame at once: it never waits for
the other cameras, which would add latency to every frame.

The buffer also carries wake-ups without a frame, so that the worker can put configuration
changes (a new vocabulary, a new method) in force as soon as they are prepared (beside it, by the
node's change encoder), even when no images arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

# Step of a FrameWorker -> what the worker is doing then, for the log.
WORKER_STEPS = {
    "start": "starting",
    "between_frames": "putting a prepared change in force",
    "after_frames": "answering a ~/segment request",
    "handle_frames": "segmenting frames",
}
WORKER_STOP_TIMEOUT_S = 5.0


class FrameBuffer(Generic[T]):
    """One newest-item slot per source: ``put`` overwrites a slot, ``take`` empties them all."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._slots: dict[Hashable, T] = {}  # filled slots, in the order they were filled
        self._woken = False
        self._closed = False
        self.overwritten = 0  # frames replaced before the worker took them

    def put(self, frame: T, slot: Hashable = None) -> bool:
        """Store ``frame`` in ``slot``; return True when it replaced a frame never taken."""
        with self._condition:
            if self._closed:
                return False
            replaced = slot in self._slots
            if replaced:
                self.overwritten += 1
            self._slots[slot] = frame
            self._condition.notify()
            return replaced

    def take(self, timeout: float | None = None) -> list[T]:
        """Wait for a frame, a wake-up, close or ``timeout``; return every waiting frame.

        The list is empty after a wake-up without frames, a timeout, or close.
        """
        with self._condition:
            self._condition.wait_for(
                lambda: bool(self._slots) or self._woken or self._closed, timeout
            )
            self._woken = False
            if self._closed:
                return []
            frames = list(self._slots.values())
            self._slots.clear()
            return frames

    def wake(self) -> None:
        """Make a waiting ``take`` return (maybe with no frame) so the worker can do other work."""
        with self._condition:
            self._woken = True
            self._condition.notify()

    def clear(self) -> None:
        """Drop the pending frames, e.g. while inference is paused."""
        with self._condition:
            self._slots.clear()

    def close(self) -> None:
        """Refuse new frames and release the worker for good."""
        with self._condition:
            self._closed = True
            self._slots.clear()
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class FrameWorker(Generic[T]):
    """A thread that runs ``between_frames``, ``handle_frames`` for the newest frames, then
    ``after_frames``.

    ``between_frames`` runs after every wake-up, before the frames (if any) are handled: the place
    to apply accepted configuration changes so that they take effect on the next frame.
    ``handle_frames`` gets every frame taken at once (at most one per slot), never an empty list.
    ``after_frames`` runs after every wake-up too, after the frames: the place for one piece of
    other work (e.g. one on-demand request), so that the frames taken next wait for it alone.
    An exception from either callable goes to ``on_error`` and the loop goes on: one failed frame
    (a CUDA out-of-memory, a bad input) must not end the node's service.

    ``stop``: the event that ends the worker (``stop`` sets it), shared with whatever the
    callables run so that a long step (text encoding, an inference stage) can end early too, by
    raising. Once it is set, an exception from a callable is the stop itself (or a consequence of
    the shutdown under way): it is not reported, and the worker ends. ``start``: run once on the
    thread before anything else (e.g. pinning its CPU threads: ``core/side_encoding``).
    """

    def __init__(
        self,
        buffer: FrameBuffer[T],
        handle_frames: Callable[[list[T]], None],
        between_frames: Callable[[], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        name: str = "ovss_worker",
        stop: threading.Event | None = None,
        start: Callable[[], None] | None = None,
        after_frames: Callable[[], None] | None = None,
    ) -> None:
        self._buffer = buffer
        self._after_frames = after_frames
        self._handle_frames = handle_frames
        self._between_frames = between_frames
        self._on_error = on_error
        self._on_start = start
        self.stopping = stop if stop is not None else threading.Event()
        self.step: str | None = None  # a WORKER_STEPS key while that step runs
        # Daemon: a worker stuck inside a long forward pass must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Set the stop event, close the buffer and wait for the thread; return False if it is
        still busy after ``timeout`` seconds (``step`` says with what)."""
        self.stopping.set()
        self._buffer.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        if self._on_start is not None:
            self._guarded("start", self._on_start)
        while not self._stopped():
            frames = self._buffer.take()
            if self._stopped():
                break
            if self._between_frames is not None:
                self._guarded("between_frames", self._between_frames)
            if frames and not self._stopped():
                self._guarded("handle_frames", self._handle_frames, frames)
            if self._after_frames is not None and not self._stopped():
                self._guarded("after_frames", self._after_frames)

    def _stopped(self) -> bool:
        return self._buffer.closed or self.stopping.is_set()

    def _guarded(self, step: str, function: Callable[..., None], *args: object) -> None:
        self.step = step
        try:
            function(*args)
        except Exception as error:  # the worker must survive any frame
            if self._on_error is not None and not self.stopping.is_set():
                try:
                    self._on_error(error)
                except Exception:  # never let reporting kill the thread
                    pass
        finally:
            self.step = None


def stop_worker(worker: FrameWorker | None, warn: Callable[[str], None]) -> None:
    """Stop ``worker`` (its stop event is set already); ``warn`` if it is still busy after
    WORKER_STOP_TIMEOUT_S, saying with what: it is not waited for any longer."""
    if worker is not None and not worker.stop(timeout=WORKER_STOP_TIMEOUT_S):
        doing = WORKER_STEPS.get(worker.step or "", "working")
        warn(
            f"worker still {doing} {WORKER_STOP_TIMEOUT_S:.0f} s after the stop request: "
            "not waiting for it"
        )
