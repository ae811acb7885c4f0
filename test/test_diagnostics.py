"""Diagnostics without ROS: counters, the sliding window, levels, and the message they make."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from ovss_ros.ros.diagnostics import (
    ERROR,
    NOT_AVAILABLE,
    OK,
    OUTCOMES,
    WARN,
    CameraStats,
    FrameCounters,
    NodeState,
    camera_report,
    status_message,
)
from ovss_ros.ros.node_diagnostics import gpu_memory_mib

STATE = NodeState(device="cpu", vocabulary_size=3, enabled=True)
KEYS = [
    "rate (frames/s)",
    "latency median (ms)",
    "latency max (ms)",
    "inference median (ms)",
    "inference max (ms)",
    "window (s)",
    "segmenting for (s)",
    "frames received",
    "frames processed",
    "frames dropped (paused)",
    "frames dropped (stale)",
    "frames dropped (overwritten)",
    "frames rejected",
    "frames failed",
    "frames in progress",
    "batched frames",
    "frames with unusable stamp",
    "vocabulary size",
    "parameter change",
    "callback errors",
    "device",
    "GPU memory allocated (MiB)",
    "GPU memory reserved (MiB)",
    "enabled",
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stats(clock) -> CameraStats:
    return CameraStats(window_s=5.0, clock=clock)


def serve(stats: CameraStats, frames: int, inference_s: float = 0.02, latency_s=0.05) -> None:
    for _ in range(frames):
        stats.receive()
        stats.settle("processed", inference_s, latency_s)


def frames(stats: CameraStats, outcome: str, count: int = 1) -> None:
    """``count`` frames received and given ``outcome``."""
    for _ in range(count):
        stats.receive()
        stats.settle(outcome)


def accounted(totals: FrameCounters) -> bool:
    """received = processed + dropped (each reason) + rejected + failed + in progress."""
    outcomes = sum(getattr(totals, name) for name in OUTCOMES)
    return totals.received == outcomes + totals.in_progress


def test_counters_subtract_field_by_field():
    later = FrameCounters(received=10, processed=7, rejected=2, batched=4)
    earlier = FrameCounters(received=4, processed=3, rejected=2)
    assert later.minus(earlier) == FrameCounters(received=6, processed=4, batched=4)


def test_report_has_every_key_and_cumulative_counts(stats, clock):
    serve(stats, 8, inference_s=0.01, latency_s=0.03)
    frames(stats, "rejected", 2)
    frames(stats, "dropped_overwritten", 3)
    stats.count("batched", 8)
    clock.now += 2.0
    report = camera_report(stats.window(), STATE)
    assert [key for key, _ in report.values] == KEYS
    assert report.value("rate (frames/s)") == "4.00"
    assert report.value("latency median (ms)") == "30.0"
    assert report.value("inference max (ms)") == "10.0"
    assert report.value("frames received") == "13"
    assert report.value("frames processed") == "8"
    assert report.value("frames rejected") == "2"
    assert report.value("frames dropped (overwritten)") == "3"
    assert report.value("batched frames") == "8"
    assert report.value("vocabulary size") == "3"
    assert report.value("device") == "cpu"
    assert report.value("GPU memory allocated (MiB)") == NOT_AVAILABLE
    assert report.value("enabled") == "true"
    assert report.value("frames in progress") == "0"
    assert report.value("parameter change") == "none"


def test_every_frame_gets_one_outcome_and_the_sum_always_holds(stats, clock):
    stats.receive()  # waiting in its slot
    stats.receive()
    stats.receive("dropped_paused")  # arrived while paused: settled at once
    assert stats.totals == FrameCounters(received=3, in_progress=2, dropped_paused=1)
    assert accounted(stats.totals)
    stats.settle("dropped_overwritten")
    stats.settle("processed", 0.01, None)
    assert stats.totals == FrameCounters(
        received=3, processed=1, dropped_paused=1, dropped_overwritten=1
    )
    report = camera_report(stats.window(), STATE)
    assert report.value("frames dropped (paused)") == "1"
    assert report.value("frames in progress") == "0"
    with pytest.raises(ValueError, match="unknown outcome"):
        stats.settle("vanished")
    for name in ("received", "in_progress", "processed", "dropped_paused"):
        with pytest.raises(ValueError, match="frame accounting"):
            stats.count(name)


def test_unusable_stamps_warn(stats, clock):
    serve(stats, 2, latency_s=None)
    stats.count("unusable_stamp", 2)
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    assert report.level == WARN
    assert "2 frames with an unusable header stamp (age unknown)" in report.message
    assert report.value("frames with unusable stamp") == "2"


def test_a_failed_parameter_change_warns_until_one_is_applied(stats, clock):
    failed = NodeState(
        device="cpu",
        vocabulary_size=3,
        enabled=True,
        parameter_change="classes: RuntimeError: out of memory; previous settings in force",
        parameter_change_failed=True,
    )
    serve(stats, 3)
    clock.now += 1.0
    report = camera_report(stats.window(), failed)
    assert report.level == WARN
    assert "parameter change failed: classes: RuntimeError: out of memory" in report.message
    assert report.value("parameter change").startswith("classes: RuntimeError")
    applied = NodeState(device="cpu", vocabulary_size=2, enabled=True, parameter_change="applied")
    report = camera_report(stats.window(), applied)
    assert report.level == OK and report.value("parameter change") == "applied"


def test_frames_dropped_while_paused_are_no_sign_of_a_stuck_model(stats, clock):
    stats.receive("dropped_paused")
    stats.receive("dropped_paused")
    clock.now += 1.0
    # Just resumed: the window holds only frames that came while paused.
    report = camera_report(stats.window(), STATE)
    assert report.level == OK and report.message == "no frames"


def test_steady_serving_is_ok(stats, clock):
    serve(stats, 10)
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    assert report.level == OK
    assert report.message == "segmenting at 10.0 frames/s"


def test_window_slides_and_counters_stay_cumulative(stats, clock):
    latencies = iter([0.5, 0.01])  # two slow frames in the first second, then fast ones
    for _ in range(6):  # one report a second, two frames in the first two seconds only
        if clock.now < 102.0:
            serve(stats, 2, latency_s=next(latencies))
        clock.now += 1.0
        window = stats.window()
    # Window of 5 s: the first second (the slow frames) has left it.
    assert window.duration_s == pytest.approx(5.0)
    assert window.counts.processed == 2
    assert [s.latency_s for s in window.samples] == [0.01, 0.01]
    report = camera_report(window, STATE)
    assert report.value("frames processed") == "4"
    assert report.value("latency max (ms)") == "10.0"
    clock.now += 5.0
    report = camera_report(stats.window(), STATE)
    assert report.value("rate (frames/s)") == "0.00"
    assert report.value("latency median (ms)") == NOT_AVAILABLE
    assert report.level == OK and report.message == "no frames"


def test_unstamped_frames_have_no_latency(stats, clock):
    serve(stats, 3, latency_s=None)
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    assert report.value("latency median (ms)") == NOT_AVAILABLE
    assert report.value("inference median (ms)") == "20.0"


def test_rejected_frames_warn(stats, clock):
    serve(stats, 5)
    frames(stats, "rejected")
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    assert report.level == WARN
    assert "1 frames rejected" in report.message


def test_some_failures_warn_and_all_failures_are_an_error(stats, clock):
    serve(stats, 3)
    frames(stats, "failed")
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    assert report.level == WARN and "failed for 1 of 4 frames" in report.message
    clock.now += 10.0  # the window now holds only what follows
    stats.window()
    frames(stats, "failed", 2)
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    assert report.level == ERROR and "every frame (2)" in report.message
    assert report.value("frames failed") == "3"


def test_frames_arriving_but_none_segmented_warn(stats, clock):
    frames(stats, "dropped_stale", 4)
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    assert report.level == WARN
    assert report.message == "frames arrive but none was segmented, 4 too old"


def test_model_slower_than_the_window_is_ok_and_says_it_is_segmenting(stats, clock):
    """Issue 20: pnp_ovss / twostream / sd2 on a CPU take longer than the window per frame; while
    the worker segments a frame, arriving frames are overwritten and none finishes in the
    window: that is working, not stuck."""
    stats.receive()  # the frame being segmented
    stats.start_segmenting()
    for _ in range(6):
        clock.now += 1.0
        frames(stats, "dropped_overwritten")
        report = camera_report(stats.window(), STATE)
    clock.now += 3.0
    report = camera_report(stats.window(), STATE)
    assert report.level == OK
    assert report.message == "segmenting a frame (9 s so far)"
    assert report.value("segmenting for (s)") == "9.0"
    stats.settle("processed", 9.0, 9.0)
    stats.stop_segmenting()
    report = camera_report(stats.window(), STATE)
    assert report.level == OK and report.message.startswith("segmenting at")
    assert report.value("segmenting for (s)") == "n/a"


def test_frames_arriving_and_nothing_segmenting_stays_a_warn(stats, clock):
    """A real stall: frames arrive and are overwritten, no frame is being segmented."""
    stats.start_segmenting()
    stats.stop_segmenting()
    frames(stats, "dropped_overwritten", 5)
    clock.now += 6.0
    report = camera_report(stats.window(), STATE)
    assert report.level == WARN
    assert report.message == "frames arrive but none was segmented"


def test_paused_node_is_ok_and_says_why(stats, clock):
    for _ in range(4):
        stats.receive("dropped_paused")
    clock.now += 1.0
    state = NodeState(device="cpu", vocabulary_size=3, enabled=False)
    report = camera_report(stats.window(), state)
    assert report.level == OK and report.message == "inference paused"
    assert report.value("enabled") == "false"
    frames(stats, "rejected")  # what happened before the pause still shows
    clock.now += 1.0
    report = camera_report(stats.window(), state)
    assert report.level == WARN
    assert report.message == (
        "inference paused; 1 frames rejected (encoding, size, data or pixel limit)"
    )


def test_callback_errors_are_counted_and_warn_while_recent(stats, clock):
    """Issue 18: an error inside a callback (a malformed request) is survived; the count shows,
    and the status warns while one happened within the window."""
    serve(stats, 2)
    clock.now += 1.0
    recent = replace(STATE, callback_errors=3, recent_callback_errors=1)
    report = camera_report(stats.window(), recent)
    assert report.level == WARN and report.value("callback errors") == "3"
    assert "1 request or callback errors in the last 5 s" in report.message
    report = camera_report(stats.window(), replace(STATE, callback_errors=3))
    assert report.level == OK and report.value("callback errors") == "3"


def test_gpu_memory_is_shown_in_mib():
    state = NodeState(device="cuda:0", vocabulary_size=3, enabled=True, gpu_memory_mib=(1.5, 64))
    report = camera_report(CameraStats().window(), state)
    assert report.value("GPU memory allocated (MiB)") == "1.5"
    assert report.value("GPU memory reserved (MiB)") == "64.0"


def test_no_gpu_memory_off_cuda():
    assert gpu_memory_mib("cpu") is None


def test_status_message_carries_level_name_hardware_and_values(stats, clock):
    frames(stats, "rejected")
    clock.now += 1.0
    report = camera_report(stats.window(), STATE)
    status = status_message("ovss: front", "cuda:0", report)
    assert status.level == bytes([WARN])
    assert (status.name, status.hardware_id, status.message) == (
        "ovss: front",
        "cuda:0",
        report.message,
    )
    assert [(kv.key, kv.value) for kv in status.values] == list(report.values)


def test_counting_from_threads_loses_nothing_and_every_report_adds_up(stats):
    """The executor thread receives, the worker settles, the timer reports, all at once: no
    count is lost, and every report's totals add up (received and the outcome of a frame
    change together)."""
    done = threading.Event()

    def executor() -> None:
        for index in range(20000):
            stats.receive("dropped_paused" if index % 4 == 0 else None)

    def worker() -> None:
        settled = 0
        while settled < 15000:
            if stats.totals.in_progress > 0:
                stats.settle("rejected" if settled % 2 else "processed", 0.0, None)
                settled += 1

    reports = []

    def timer() -> None:
        while not done.is_set():
            reports.append(stats.window().totals)

    threads = [threading.Thread(target=f) for f in (executor, worker)]
    reporter = threading.Thread(target=timer)
    reporter.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reporter.join()
    assert stats.totals == FrameCounters(
        received=20000, dropped_paused=5000, processed=7500, rejected=7500
    )
    assert len(reports) > 10
    assert all(accounted(totals) for totals in reports)


def test_gpu_memory_comes_from_torchs_allocator_on_cuda(monkeypatch):
    import torch

    asked = []

    def allocated(device):
        asked.append(device)
        return 3 * 2**20

    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 8 * 2**20)
    assert gpu_memory_mib("cuda:1") == (3.0, 8.0)
    assert gpu_memory_mib(torch.device("cuda", 0)) == (3.0, 8.0)
    assert asked == ["cuda:1", torch.device("cuda", 0)]
    assert gpu_memory_mib(torch.device("cpu")) is None
