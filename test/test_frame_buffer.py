"""The newest-frame buffer and its worker: no queueing, no lost wake-ups, survives errors,
one slot per camera and every ready camera taken at once, stops on its stop event.

Waits are on conditions with generous limits (a busy machine may not schedule a thread for a
while); no assertion depends on how fast something happens."""

from __future__ import annotations

import threading
import time

from ovss_ros.ros.worker import FrameBuffer, FrameWorker

LIMIT_S = 30.0  # for anything another thread must do: generous, never waited out when passing


def wait_until(predicate, timeout: float = LIMIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_put_overwrites_and_counts():
    buffer: FrameBuffer[int] = FrameBuffer()
    assert buffer.put(1) is False
    assert buffer.put(2) is True
    assert buffer.put(3) is True
    assert buffer.overwritten == 2
    assert buffer.take(timeout=0) == [3]
    assert buffer.take(timeout=0) == []


def test_take_times_out_without_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    start = time.monotonic()
    assert buffer.take(timeout=0.05) == []
    assert time.monotonic() - start >= 0.04


def test_wake_releases_take_without_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(buffer.take(timeout=3600.0)))
    thread.start()
    time.sleep(0.02)  # most likely waiting by now; a wake before take is not lost either
    buffer.wake()
    thread.join(LIMIT_S)
    assert not thread.is_alive()  # long before the take's own timeout
    assert result == [[]]


def test_wake_before_take_is_not_lost():
    buffer: FrameBuffer[int] = FrameBuffer()
    buffer.wake()
    start = time.monotonic()
    assert buffer.take(timeout=3600.0) == []
    assert time.monotonic() - start < LIMIT_S  # returned on the wake, not the timeout


def test_close_releases_and_refuses():
    buffer: FrameBuffer[int] = FrameBuffer()
    buffer.put(1)
    buffer.close()
    assert buffer.closed
    assert buffer.take(timeout=3600.0) == []
    assert buffer.put(2) is False


def test_clear_drops_pending_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    buffer.put(1)
    buffer.put(2, slot="rear")
    buffer.clear()
    assert buffer.take(timeout=0) == []


def test_worker_handles_newest_only():
    buffer: FrameBuffer[int] = FrameBuffer()
    handled: list[int] = []
    release = threading.Event()

    def handle(frames: list[int]) -> None:
        handled.extend(frames)
        release.wait(LIMIT_S)

    worker = FrameWorker(buffer, handle)
    worker.start()
    buffer.put(0)
    assert wait_until(lambda: handled == [0])
    for frame in range(1, 10):  # arrive while frame 0 is being processed
        buffer.put(frame)
    release.set()
    assert wait_until(lambda: handled[-1] == 9)
    assert handled == [0, 9]
    assert buffer.overwritten == 8
    assert worker.stop(timeout=LIMIT_S)


def test_worker_runs_between_frames_before_each_frame_and_on_wake():
    buffer: FrameBuffer[str] = FrameBuffer()
    events: list[str] = []
    worker = FrameWorker(buffer, events.extend, lambda: events.append("apply"))
    worker.start()
    buffer.wake()
    assert wait_until(lambda: events == ["apply"])
    buffer.put("frame")
    assert wait_until(lambda: events == ["apply", "apply", "frame"])
    assert worker.stop(timeout=LIMIT_S)


def test_worker_runs_after_frames_after_the_frames_and_on_wake():
    buffer: FrameBuffer[str] = FrameBuffer()
    events: list[str] = []
    worker = FrameWorker(
        buffer,
        events.extend,
        lambda: events.append("apply"),
        after_frames=lambda: events.append("after"),
    )
    worker.start()
    buffer.wake()
    assert wait_until(lambda: events == ["apply", "after"])
    buffer.put("frame")
    assert wait_until(lambda: events == ["apply", "after", "apply", "frame", "after"])
    assert worker.stop(timeout=LIMIT_S)


def test_worker_survives_exceptions_and_reports_them():
    buffer: FrameBuffer[int] = FrameBuffer()
    errors: list[BaseException] = []
    handled: list[int] = []

    def handle(frames: list[int]) -> None:
        if frames == [1]:
            raise RuntimeError("CUDA out of memory")
        handled.extend(frames)

    def broken_reporter(error: BaseException) -> None:
        errors.append(error)
        raise ValueError("reporting failed too")

    worker = FrameWorker(buffer, handle, on_error=broken_reporter)
    worker.start()
    buffer.put(1)
    assert wait_until(lambda: len(errors) == 1)
    buffer.put(2)
    assert wait_until(lambda: handled == [2])
    assert worker.alive
    assert "out of memory" in str(errors[0])
    assert worker.stop(timeout=LIMIT_S)


def test_failed_between_frames_still_handles_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    handled: list[int] = []
    errors: list[BaseException] = []

    def broken_apply() -> None:
        raise ValueError("bad change")

    worker = FrameWorker(buffer, handled.extend, broken_apply, errors.append)
    worker.start()
    buffer.put(7)
    assert wait_until(lambda: handled == [7])
    assert errors and isinstance(errors[0], ValueError)
    assert worker.stop(timeout=LIMIT_S)


def test_stop_is_prompt_when_idle_and_idempotent():
    buffer: FrameBuffer[int] = FrameBuffer()
    worker = FrameWorker(buffer, lambda frames: None)
    worker.start()
    start = time.monotonic()
    assert worker.stop(timeout=3600.0)
    assert time.monotonic() - start < LIMIT_S  # the idle worker ended, no timeout ran out
    assert worker.stop(timeout=0.1)
    assert not worker.alive


def test_each_slot_keeps_its_newest_and_take_returns_all_in_arrival_order():
    buffer: FrameBuffer[str] = FrameBuffer()
    assert buffer.put("rear 1", slot="rear") is False
    assert buffer.put("front 1", slot="front") is False
    assert buffer.put("rear 2", slot="rear") is True  # only the same camera overwrites
    assert buffer.overwritten == 1
    assert buffer.take(timeout=0) == ["rear 2", "front 1"]
    assert buffer.take(timeout=0) == []


def test_worker_gets_the_frames_of_every_camera_that_was_ready_together():
    buffer: FrameBuffer[str] = FrameBuffer()
    batches: list[list[str]] = []
    release = threading.Event()

    def handle(frames: list[str]) -> None:
        batches.append(frames)
        release.wait(LIMIT_S)

    worker = FrameWorker(buffer, handle)
    worker.start()
    buffer.put("front 0", slot="front")
    assert wait_until(lambda: batches == [["front 0"]])  # an idle worker does not wait
    buffer.put("front 1", slot="front")  # both arrive while front 0 is being processed
    buffer.put("rear 1", slot="rear")
    release.set()
    assert wait_until(lambda: len(batches) == 2)
    assert batches[1] == ["front 1", "rear 1"]
    assert worker.stop(timeout=LIMIT_S)


def test_stop_sets_the_stop_event_that_ends_a_long_step():
    """The worker's stop event is handed to the long step (as the node hands it to its engine):
    stop() sets it, the step raises, and that exception is the stop, not an error."""
    buffer: FrameBuffer[int] = FrameBuffer()
    stop = threading.Event()
    errors: list[BaseException] = []
    started = threading.Event()

    class Stopped(Exception):
        pass

    def long_step(frames: list[int]) -> None:  # e.g. a forward pass checking between stages
        started.set()
        if stop.wait(3600.0):
            raise Stopped

    worker = FrameWorker(buffer, long_step, on_error=errors.append, stop=stop)
    worker.start()
    buffer.put(1)
    assert started.wait(LIMIT_S)
    assert worker.step == "handle_frames"
    assert worker.stop(timeout=LIMIT_S)
    assert stop.is_set() and not worker.alive
    assert errors == []


def test_an_error_during_stop_is_not_reported_and_a_busy_worker_says_with_what():
    buffer: FrameBuffer[int] = FrameBuffer()
    errors: list[BaseException] = []
    entered, release = threading.Event(), threading.Event()

    def apply_changes() -> None:  # e.g. text encoding that does not check the stop event
        entered.set()
        release.wait(LIMIT_S)
        raise RuntimeError("publisher destroyed under me")

    worker = FrameWorker(buffer, lambda frames: None, apply_changes, errors.append)
    worker.start()
    buffer.wake()
    assert entered.wait(LIMIT_S)
    assert not worker.stop(timeout=0.05)  # still inside the step
    assert worker.step == "between_frames" and worker.stopping.is_set()
    release.set()
    assert wait_until(lambda: not worker.alive)
    assert errors == []  # raised after the stop request: part of stopping


def test_a_stop_event_set_from_outside_ends_the_worker_after_its_step():
    """A shutdown signal sets the event before the node closes the buffer: no new step starts."""
    buffer: FrameBuffer[int] = FrameBuffer()
    stop = threading.Event()
    handled: list[int] = []
    worker = FrameWorker(buffer, handled.extend, stop=stop)
    worker.start()
    buffer.put(1)
    assert wait_until(lambda: handled == [1])
    stop.set()
    buffer.put(2)  # wakes the worker, which sees the stop event and ends without handling it
    assert wait_until(lambda: not worker.alive)
    assert handled == [1]
