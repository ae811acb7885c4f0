"""The newest-frame buffer and its worker: no queueing, no lost wake-ups, survives errors."""

from __future__ import annotations

import threading
import time

from ovss_ros.frame_buffer import FrameBuffer, FrameWorker


def wait_until(predicate, timeout: float = 5.0) -> bool:
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
    assert buffer.take(timeout=0) == 3
    assert buffer.take(timeout=0) is None


def test_take_times_out_without_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    start = time.monotonic()
    assert buffer.take(timeout=0.05) is None
    assert time.monotonic() - start >= 0.04


def test_wake_releases_take_without_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(buffer.take(timeout=5.0)))
    thread.start()
    time.sleep(0.02)
    buffer.wake()
    thread.join(1.0)
    assert not thread.is_alive()
    assert result == [None]


def test_wake_before_take_is_not_lost():
    buffer: FrameBuffer[int] = FrameBuffer()
    buffer.wake()
    start = time.monotonic()
    assert buffer.take(timeout=5.0) is None
    assert time.monotonic() - start < 1.0


def test_close_releases_and_refuses():
    buffer: FrameBuffer[int] = FrameBuffer()
    buffer.put(1)
    buffer.close()
    assert buffer.closed
    assert buffer.take(timeout=5.0) is None
    assert buffer.put(2) is False


def test_clear_drops_pending_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    buffer.put(1)
    buffer.clear()
    assert buffer.take(timeout=0) is None


def test_worker_handles_newest_only():
    buffer: FrameBuffer[int] = FrameBuffer()
    handled: list[int] = []
    release = threading.Event()

    def handle(frame: int) -> None:
        handled.append(frame)
        release.wait(5.0)

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
    assert worker.stop(timeout=2.0)


def test_worker_runs_between_frames_before_each_frame_and_on_wake():
    buffer: FrameBuffer[str] = FrameBuffer()
    events: list[str] = []
    worker = FrameWorker(buffer, lambda f: events.append(f), lambda: events.append("apply"))
    worker.start()
    buffer.wake()
    assert wait_until(lambda: events == ["apply"])
    buffer.put("frame")
    assert wait_until(lambda: events == ["apply", "apply", "frame"])
    assert worker.stop(timeout=2.0)


def test_worker_survives_exceptions_and_reports_them():
    buffer: FrameBuffer[int] = FrameBuffer()
    errors: list[BaseException] = []
    handled: list[int] = []

    def handle(frame: int) -> None:
        if frame == 1:
            raise RuntimeError("CUDA out of memory")
        handled.append(frame)

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
    assert worker.stop(timeout=2.0)


def test_failed_between_frames_still_handles_frame():
    buffer: FrameBuffer[int] = FrameBuffer()
    handled: list[int] = []
    errors: list[BaseException] = []

    def broken_apply() -> None:
        raise ValueError("bad change")

    worker = FrameWorker(buffer, handled.append, broken_apply, errors.append)
    worker.start()
    buffer.put(7)
    assert wait_until(lambda: handled == [7])
    assert errors and isinstance(errors[0], ValueError)
    assert worker.stop(timeout=2.0)


def test_stop_is_prompt_when_idle_and_idempotent():
    buffer: FrameBuffer[int] = FrameBuffer()
    worker = FrameWorker(buffer, lambda frame: None)
    worker.start()
    start = time.monotonic()
    assert worker.stop(timeout=2.0)
    assert time.monotonic() - start < 1.0
    assert worker.stop(timeout=0.1)
    assert not worker.alive
