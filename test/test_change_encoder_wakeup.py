"""The frame worker waiting for a quick change wakes as soon as it is prepared.

``ChangeEncoder.wait_quick``: before a frame, the worker waits while a change that needs neither
text encoding nor a model load is prepared (milliseconds), so that the change is in force for
that frame. If the worker is already waiting when the change encoder hands the change over, the
hand-over must wake it; a lost wake-up leaves the worker (and every frame behind it) waiting
out the whole limit (``QUICK_WAIT_S``, 10 s) for every quick change: the vocabulary stress test
spent 10 s on every change back to a cached vocabulary, and under a CPU hog the accounting test
saw no frame served for 29 s after ``max_input_pixels`` was set.

The change encoder runs on its real thread; the transactions are scripted (the encoder only
calls their ``prepare``) so that the worker is certainly waiting before the change is ready.
"""

from __future__ import annotations

import threading
import time

from ros_harness import EVENT_TIMEOUT_S

from ovss_ros.ros.change_encoder import ChangeEncoder
from ovss_ros.ros.transactions import Handover


class ScriptedTransactions:
    """``prepare`` announces a quick change, then holds it until ``release`` is set; after that
    one change, nothing is pending."""

    def __init__(self) -> None:
        self.handover = Handover(changes={"score_threshold": 0.5}, prepared=None, failure=None)
        self.preparing = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def prepare(self, segmenter, stop, run):
        self.calls += 1
        if self.calls > 1:
            return None
        run(False, self._hold)  # a quick change: the worker waits for it
        return self.handover

    def _hold(self) -> None:
        self.preparing.set()
        assert self.release.wait(EVENT_TIMEOUT_S), "the test never released the change"


class WatchedCondition(threading.Condition):
    """A Condition that tells when a given thread starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiter: threading.Thread | None = None
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is self.waiter:
            self.waiting.set()
        return super().wait(timeout)


def test_a_waiting_worker_takes_a_quick_change_as_soon_as_it_is_ready():
    transactions = ScriptedTransactions()
    stop = threading.Event()
    errors: list[BaseException] = []
    encoder = ChangeEncoder(transactions, lambda: None, lambda: None, stop, errors.append)
    condition = WatchedCondition()
    encoder._condition = condition  # to know when the worker waits (nothing else is changed)
    taken: dict[str, object] = {}

    def worker() -> None:
        start = time.monotonic()
        encoder.wait_quick(timeout=EVENT_TIMEOUT_S)
        taken["waited_s"] = time.monotonic() - start
        taken["handover"] = encoder.take()
        encoder.done()

    worker_thread = threading.Thread(target=worker, daemon=True)
    condition.waiter = worker_thread
    encoder.start()
    try:
        encoder.wake()
        assert transactions.preparing.wait(EVENT_TIMEOUT_S), "the change was never prepared"
        worker_thread.start()
        assert condition.waiting.wait(EVENT_TIMEOUT_S), "the worker did not wait for the change"
        transactions.release.set()  # the change is ready now, with the worker waiting
        worker_thread.join(2 * EVENT_TIMEOUT_S)
        assert not worker_thread.is_alive()
        assert taken["handover"] is transactions.handover
        # Woken by the hand-over, not by the end of its wait (a loaded machine takes well under
        # a second to switch threads; the limit is EVENT_TIMEOUT_S).
        assert taken["waited_s"] < EVENT_TIMEOUT_S, taken
        assert not errors
    finally:
        transactions.release.set()
        assert encoder.stop()
