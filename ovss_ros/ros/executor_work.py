"""Work that only the executor's thread may do, asked for by another thread (issue 18, item 1).

rclpy is not thread-safe where entities are made and unmade: the executor builds its wait set
from the node's publishers, subscriptions, timers, services, clients and guard conditions (and
the event handlers of publishers), and an entity destroyed meanwhile from another thread ends
``spin_once`` with ``InvalidHandle: cannot use Destroyable because destruction was requested``.
So every create_* and destroy_* of the node runs on the executor's thread: lifecycle transitions,
parameter callbacks and the timer run there already, and the plain node builds its entities in
the thread that then spins. The worker thread, which applies vocabulary changes, hands the mask
topics it needs over with ``ExecutorWork.run`` and waits until they exist.

A job is an iterator whose every step is one small entity operation (create or destroy one
publisher). The executor runs at most ``steps_per_call`` steps per wake-up of the guard
condition and wakes itself again for the rest, so service requests and frames are served in
between: 1000 mask topics take about 0.25 s of the executor's time in all, never in one piece.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

# Entity operations per executor callback: creating a publisher takes about 0.25 ms here.
STEPS_PER_CALL = 50
# How soon a waiting thread notices its stop event.
STOP_POLL_S = 0.05


@dataclass(eq=False)
class _Job:
    steps: Iterator[object]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class ExecutorWork:
    """Runs jobs handed over by other threads on the thread that spins the node.

    ``create_guard_condition`` is what ties it to the executor: ``node`` must be spun by the
    executor whose thread may touch the node's entities (the node's own spin loop).
    ``on_error``: called on the executor's thread with an exception a job raised (the job ends
    there; its waiter is released).
    """

    def __init__(
        self,
        node: object,
        on_error: Callable[[BaseException], None] | None = None,
        steps_per_call: int = STEPS_PER_CALL,
    ) -> None:
        self._lock = threading.Lock()
        self._jobs: deque[_Job] = deque()
        self._steps_per_call = steps_per_call
        self._on_error = on_error
        self._guard = node.create_guard_condition(self._run)

    def run(self, steps: Iterable[object], stop: threading.Event) -> bool:
        """Have the executor's thread run ``steps`` (an iterable whose iteration does the work);
        wait until it has, or until ``stop`` is set. True when the job is done (even if it
        raised: ``on_error`` was told); False when stopped or cancelled first."""
        job = _Job(iter(steps))
        with self._lock:
            self._jobs.append(job)
        self._guard.trigger()
        while not job.done.wait(STOP_POLL_S):
            if stop.is_set():
                return False
        return job.error is not _CANCELLED

    def cancel(self) -> None:
        """Drop every job not run yet and release its waiter (the outputs are going away).
        Call on the executor's thread."""
        with self._lock:
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:
            job.error = _CANCELLED
            job.done.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _run(self) -> None:
        """The guard condition's callback, on the executor's thread."""
        budget = self._steps_per_call
        while budget > 0:
            with self._lock:
                if not self._jobs:
                    return
                job = self._jobs[0]
            try:
                next(job.steps)
                budget -= 1
                continue
            except StopIteration:
                pass
            except Exception as error:  # the job ends; the executor goes on
                job.error = error
                if self._on_error is not None:
                    self._on_error(error)
            with self._lock:
                if self._jobs and self._jobs[0] is job:
                    self._jobs.popleft()
            job.done.set()
        if self.pending:
            self._guard.trigger()  # more to do: after the other callbacks ready now


class _Cancelled(Exception):
    pass


_CANCELLED = _Cancelled("cancelled")
