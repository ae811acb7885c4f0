"""The thread that prepares accepted parameter changes beside the frame worker.

Text encoding (20 classes with the 80 ImageNet templates: half a minute on a CPU) and any model a
change needs (a VLM, a Stable Diffusion model, a DeOP checkpoint) are prepared here, never in
front of a frame: the frame worker keeps segmenting and publishing with the vocabulary in force
meanwhile. A prepared change is handed over (``Handover``) and the worker commits it between two
frames (``ParameterTransactions.commit``), so the swap is atomic; this thread waits for that
before it prepares the next change, so a change is always prepared against the state in force.

A change that needs neither text encoding nor a model load (a threshold, an output setting) is
prepared in milliseconds, on this thread at the frames' priority, and the worker waits for it
(``wait_quick``): it is in force for the next frame, as the parameter was answered. A slow change
is prepared on a second thread (``LowPriorityThread``) with the bounds of ``core/side_encoding``
(one intra-op thread, nice +10): a thread's nice value cannot be lowered again without
privileges, so the quick changes must never run there (on a loaded machine a nice +10 thread can
wait seconds for a core). A change accepted while another is being prepared
supersedes it: the encoding in progress stops
(its ``cancel`` event; the texts it finished stay cached), and the two are prepared again as one,
the newer values winning. The node's stop event ends this thread at once too (text encoding
checks it between prompt batches).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ovss_ros.core import Stopped
from ovss_ros.ros.transactions import SUPERSEDED, Handover, ParameterTransactions

if TYPE_CHECKING:
    from ovss_ros.core.segmenter import Segmenter

ENCODER_STOP_TIMEOUT_S = 5.0
QUICK_WAIT_S = 10.0  # the most a frame waits for a quick change (normally milliseconds)


class LowPriorityThread:
    """A daemon thread that runs slow preparations one at a time, bounded by ``bound`` (called
    once on the thread before its first job: ``SideEncoding.encoding_thread``).

    Not a ``ThreadPoolExecutor(1, initializer=bound)``: its workers are joined at interpreter
    exit (a model load cannot stop half-way and would hold the node's exit), and the caller
    must return as soon as the node's stop event is set, not when the work ends."""

    def __init__(self, name: str, stop: threading.Event) -> None:
        self._name = name
        self._stop = stop
        self._condition = threading.Condition()
        self._job: tuple[Callable[[], Any], dict[str, Any]] | None = None
        self._thread: threading.Thread | None = None

    def run(self, work: Callable[[], Any], bound: Callable[[], None]) -> Any:
        """Run ``work()`` on the thread and return its result or raise its exception; raises
        Stopped as soon as the stop event is set (the work is left to end on its own)."""
        outcome: dict[str, Any] = {}
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, args=(bound,), name=self._name, daemon=True
                )
                self._thread.start()
            self._job = (work, outcome)
            self._condition.notify_all()
            self._condition.wait_for(lambda: "done" in outcome or self._stop.is_set())
        if "done" not in outcome:
            raise Stopped()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def wake(self) -> None:
        """The stop event was set: the waiting caller returns."""
        with self._condition:
            self._condition.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for the thread to end; False if it is still busy."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _loop(self, bound: Callable[[], None]) -> None:
        bound()
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._job is not None or self._stop.is_set())
                if self._job is None:
                    return
                (work, outcome), self._job = self._job, None
            try:
                outcome["result"] = work()
            except BaseException as error:  # handed to the caller
                outcome["error"] = error
            with self._condition:
                outcome["done"] = True
                self._condition.notify_all()


class ChangeEncoder:
    """Prepares the transactions' pending changes on its own thread and hands each to the frame
    worker (``hand_over``: wakes the worker, whose ``take`` then gets it).

    ``stop``: the node's stop event (the Segmenter's): set, the thread ends, an encoding in
    progress with it. ``on_error``: an error nobody expected (the thread goes on).
    """

    def __init__(
        self,
        transactions: ParameterTransactions,
        segmenter: Callable[[], Segmenter | None],
        hand_over: Callable[[], None],
        stop: threading.Event,
        on_error: Callable[[BaseException], None],
        name: str = "ovss_change_encoder",
    ) -> None:
        self._transactions = transactions
        self._segmenter = segmenter
        self._hand_over = hand_over
        self._stop = stop
        self._on_error = on_error
        self._condition = threading.Condition()
        self._wanted = False  # changes may be pending
        self._ready: Handover | None = None  # prepared, waiting for the worker
        self._in_hand = False  # the worker took a change and is putting it in force
        self._phase = "idle"  # idle | classifying | quick | slow: the change being prepared
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._slow_thread = LowPriorityThread(f"{name}_slow", stop)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Changes are pending (executor thread, after accepting them)."""
        with self._condition:
            self._wanted = True
            self._condition.notify_all()

    def stop(self, timeout: float = ENCODER_STOP_TIMEOUT_S) -> bool:
        """Set the stop event and wait for the threads (this one and the low-priority one);
        False if one is still busy after ``timeout`` seconds (e.g. loading a model, which cannot
        stop half-way)."""
        self._stop.set()
        with self._condition:
            self._condition.notify_all()
        self._slow_thread.wake()
        deadline = time.monotonic() + timeout
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        # The slow preparation ends too (text encoding checks the stop event between batches),
        # so nothing of it runs on while the process exits.
        slow_ended = self._slow_thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive() and slow_ended

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_quick(self, timeout: float = QUICK_WAIT_S) -> None:
        """Worker thread, before a frame: wait (at most ``timeout`` s) while an accepted change
        that needs neither text encoding nor a model load is being prepared, so that it is in
        force for the next frame (milliseconds); a slow change is not waited for."""
        with self._condition:
            self._condition.wait_for(
                lambda: (
                    self._stop.is_set()
                    or self._ready is not None
                    or not (
                        self._phase in ("classifying", "quick")
                        or (self._phase == "idle" and self._wanted)
                    )
                ),
                timeout,
            )

    def take(self) -> Handover | None:
        """The prepared change waiting for the worker, or None (worker thread), after
        ``wait_quick``; it is the worker's then, which must call ``done`` once it has committed
        or settled it."""
        self.wait_quick()
        with self._condition:
            handover, self._ready = self._ready, None
            self._in_hand = self._in_hand or handover is not None
            return handover

    def done(self) -> None:
        """The worker has put the handed-over change in force (or settled its failure)."""
        with self._condition:
            self._in_hand = False
            self._condition.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._condition:
                self._condition.wait_for(lambda: self._wanted or self._stop.is_set())
                self._wanted = False
                self._phase = "classifying"
            if self._stop.is_set():
                return
            try:
                self._prepare_all()
            except Stopped:
                return
            except Exception as error:  # the thread must survive any change
                if not self._stop.is_set():
                    self._on_error(error)
            finally:
                self._set_phase("idle")

    def _prepare_all(self) -> None:
        """Prepare and hand over what is pending until nothing is (a superseded change comes
        back merged with the newer one)."""
        while not self._stop.is_set():
            self._set_phase("classifying")
            handover = self._transactions.prepare(self._segmenter(), self._stop, self._run_one)
            if handover is SUPERSEDED:
                continue  # prepare the merged change
            if handover is None:
                return
            with self._condition:
                self._ready = handover
                self._condition.notify_all()  # a worker in wait_quick takes it now
            self._hand_over()
            with self._condition:
                self._condition.wait_for(
                    lambda: (self._ready is None and not self._in_hand) or self._stop.is_set()
                )
                left, self._ready = self._ready, None  # not taken: stopping
            segmenter = self._segmenter()
            if left is not None and left.prepared is not None and segmenter is not None:
                segmenter.discard(left.prepared)  # stopping: never put in force

    def _run_one(self, slow: bool, work: Callable[[], Any]) -> Any:
        """Prepare one change: a quick one here, a slow one on the low-priority thread."""
        self._set_phase("slow" if slow else "quick")
        if not slow:
            return work()
        return self._slow_thread.run(work, self._bound_slow_thread)

    def _bound_slow_thread(self) -> None:
        segmenter = self._segmenter()
        if segmenter is not None:
            segmenter.side.encoding_thread()

    def _set_phase(self, phase: str) -> None:
        with self._condition:
            self._phase = phase
            self._condition.notify_all()


def stop_change_encoder(encoder: ChangeEncoder | None, warn: Callable[[str], None]) -> None:
    """Stop ``encoder``; ``warn`` if it is still busy after ENCODER_STOP_TIMEOUT_S (loading a
    model cannot stop half-way): it is not waited for any longer (a daemon thread)."""
    if encoder is not None and not encoder.stop():
        warn(
            f"change encoder still busy {ENCODER_STOP_TIMEOUT_S:.0f} s after the stop request "
            "(loading a model): not waiting for it"
        )
