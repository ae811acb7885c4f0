"""What happened to each camera's frames, as the statuses the node publishes on /diagnostics.

diagnostic_updater has no Python wheel, and all it would do here is call a function once a second,
so the node does that itself with a timer. Everything else lives in this module and needs no ROS
to run: ``CameraStats`` collects counters and per-frame samples from the node's threads;
``camera_report`` turns a window of them into a ``Report`` (level, message, key/values); and
``status_message`` makes the diagnostic_msgs/DiagnosticStatus out of it.

Rates, latencies and levels look at a sliding window of the last few seconds, not at one timer
period: a model slower than one frame a second would otherwise flap between "no frames" and "ok".
Counters are cumulative, so two reports can be compared without knowing the window.

Every frame is accounted for: a received frame is "in progress" (waiting in the newest-frame slot
or being segmented) until it gets exactly one outcome (processed, dropped paused / stale /
overwritten, rejected or failed), and both changes happen under one lock, so every report holds
``received = processed + dropped (each reason) + rejected + failed + in progress``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, replace

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

# diagnostic_msgs/DiagnosticStatus levels.
OK, WARN, ERROR = 0, 1, 2
WINDOW_S = 5.0
NOT_AVAILABLE = "n/a"


@dataclass(frozen=True)
class FrameCounters:
    """What happened to a camera's frames since start-up (or within a window: ``minus``)."""

    received: int = 0
    processed: int = 0  # segmented and published
    dropped_paused: int = 0  # arrived or waiting while inference was paused or inactive
    dropped_stale: int = 0  # older than max_frame_age
    dropped_overwritten: int = 0  # replaced by a newer frame before the worker took it
    rejected: int = 0  # could not be converted (bad encoding, size or data; too many pixels)
    failed: int = 0  # inference or publishing raised (e.g. out of GPU memory)
    in_progress: int = 0  # received, no outcome yet (a level, not a count)
    batched: int = 0  # segmented in one forward pass together with another camera's frame
    unusable_stamp: int = 0  # header stamp rclpy cannot represent: age unknown

    def minus(self, earlier: FrameCounters) -> FrameCounters:
        return FrameCounters(
            *(a - b for a, b in zip(astuple(self), astuple(earlier), strict=True))
        )


@dataclass(frozen=True)
class FrameSample:
    """One published frame: when, how long its forward pass took, and its age at publication."""

    time: float  # monotonic seconds at publication
    inference_s: float  # wall time of the segment_many call that produced it
    latency_s: float | None  # header stamp to publication; None for an unstamped frame


@dataclass(frozen=True)
class Window:
    """A camera's recent past: counts within the window, totals since start-up, samples."""

    duration_s: float
    counts: FrameCounters
    totals: FrameCounters
    samples: tuple[FrameSample, ...]


# A frame's outcome: exactly one per received frame.
OUTCOMES = (
    "processed",
    "dropped_paused",
    "dropped_stale",
    "dropped_overwritten",
    "rejected",
    "failed",
)


class CameraStats:
    """Counters and samples of one camera. Thread-safe: the executor thread counts received,
    overwritten and paused frames, the worker the rest, and the diagnostics timer reads windows.
    """

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._window_s = window_s
        self._totals = FrameCounters()
        self._samples: deque[FrameSample] = deque()
        # (time, totals) at the start of the window and at every report since.
        self._history: deque[tuple[float, FrameCounters]] = deque([(clock(), self._totals)])

    def receive(self, outcome: str | None = None) -> None:
        """Count a received frame: in progress, or settled at once with ``outcome``."""
        with self._lock:
            self._add(received=1, **{outcome or "in_progress": 1})

    def settle(
        self, outcome: str, inference_s: float | None = None, latency_s: float | None = None
    ) -> None:
        """Give a frame in progress its one outcome (``OUTCOMES``); a processed frame's sample
        (inference seconds; latency seconds, None when its age is unknown) is recorded too."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            self._add(in_progress=-1, **{outcome: 1})
            if outcome == "processed":
                self._samples.append(FrameSample(self._clock(), inference_s or 0.0, latency_s))

    def count(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to a counter that is no outcome (``batched``, ``unusable_stamp``)."""
        if counter in OUTCOMES or counter in ("received", "in_progress"):
            raise ValueError(f"{counter} is part of the frame accounting: receive() / settle()")
        with self._lock:
            self._add(**{counter: amount})

    def _add(self, **amounts: int) -> None:
        values = {name: getattr(self._totals, name) + amount for name, amount in amounts.items()}
        self._totals = replace(self._totals, **values)

    @property
    def totals(self) -> FrameCounters:
        return self._totals

    def window(self) -> Window:
        """The last ``window_s`` seconds (less right after start-up); called once per report."""
        with self._lock:
            now = self._clock()
            self._history.append((now, self._totals))
            # Keep the newest report at or before the window's start as its left edge.
            while len(self._history) > 2 and self._history[1][0] <= now - self._window_s:
                self._history.popleft()
            start, at_start = self._history[0]
            while self._samples and self._samples[0].time < start:
                self._samples.popleft()
            return Window(
                duration_s=now - start,
                counts=self._totals.minus(at_start),
                totals=self._totals,
                samples=tuple(self._samples),
            )


@dataclass(frozen=True)
class NodeState:
    """What every camera's status shares: the one model and whether it is segmenting."""

    device: str
    vocabulary_size: int
    enabled: bool
    gpu_memory_mib: tuple[float, float] | None = None  # (allocated, reserved); None off CUDA
    not_enabled_reason: str = "inference paused"
    parameter_change: str = "none"  # the last accepted change: none | applied | why it failed
    parameter_change_failed: bool = False


@dataclass(frozen=True)
class Report:
    """A status without ROS types: level (OK, WARN, ERROR), one-line message, key/values."""

    level: int
    message: str
    values: tuple[tuple[str, str], ...]

    def value(self, key: str) -> str:
        return dict(self.values)[key]


def camera_report(window: Window, state: NodeState) -> Report:
    """Level and message from what happened within the window; counters are cumulative.

    ERROR: inference failed for every frame it was tried on. WARN: some failed, some frames were
    rejected or had an unusable stamp, frames arrive but none is segmented (all stale, or the
    model is stuck) while inference is enabled, or the last accepted parameter change could not
    be applied (the previous settings stay in force). OK otherwise. While paused, the message
    starts with why.
    """
    counts = window.counts
    rate = counts.processed / window.duration_s if window.duration_s > 0 else 0.0
    problems: list[tuple[int, str]] = []
    if counts.failed and not counts.processed:
        problems.append((ERROR, f"inference failed for every frame ({counts.failed})"))
    elif counts.failed:
        attempts = counts.failed + counts.processed
        problems.append((WARN, f"inference failed for {counts.failed} of {attempts} frames"))
    if counts.rejected:
        problems.append(
            (WARN, f"{counts.rejected} frames rejected (encoding, size, data or pixel limit)")
        )
    if counts.unusable_stamp:
        problems.append(
            (WARN, f"{counts.unusable_stamp} frames with an unusable header stamp (age unknown)")
        )
    unused = not (counts.processed or counts.failed or counts.rejected)
    if state.enabled and counts.received > counts.dropped_paused and unused:
        stale = f", {counts.dropped_stale} too old" if counts.dropped_stale else ""
        problems.append((WARN, f"frames arrive but none was segmented{stale}"))
    if state.parameter_change_failed:
        problems.append((WARN, f"parameter change failed: {state.parameter_change}"))
    messages = [text for _, text in problems]
    if not state.enabled:
        messages.insert(0, state.not_enabled_reason)
    elif not messages:
        arrived = counts.received - counts.dropped_paused  # while segmenting
        messages.append(f"segmenting at {rate:.1f} frames/s" if arrived else "no frames")
    level = max((level for level, _ in problems), default=OK)
    message = "; ".join(messages)

    latencies = [s.latency_s * 1e3 for s in window.samples if s.latency_s is not None]
    inference = [s.inference_s * 1e3 for s in window.samples]
    totals = window.totals
    allocated, reserved = (
        (f"{mib:.1f}" for mib in state.gpu_memory_mib)
        if state.gpu_memory_mib is not None
        else (NOT_AVAILABLE, NOT_AVAILABLE)
    )
    values = (
        ("rate (frames/s)", f"{rate:.2f}"),
        ("latency median (ms)", _median(latencies)),
        ("latency max (ms)", _max(latencies)),
        ("inference median (ms)", _median(inference)),
        ("inference max (ms)", _max(inference)),
        ("window (s)", f"{window.duration_s:.1f}"),
        ("frames received", str(totals.received)),
        ("frames processed", str(totals.processed)),
        ("frames dropped (paused)", str(totals.dropped_paused)),
        ("frames dropped (stale)", str(totals.dropped_stale)),
        ("frames dropped (overwritten)", str(totals.dropped_overwritten)),
        ("frames rejected", str(totals.rejected)),
        ("frames failed", str(totals.failed)),
        ("frames in progress", str(totals.in_progress)),
        ("batched frames", str(totals.batched)),
        ("frames with unusable stamp", str(totals.unusable_stamp)),
        ("vocabulary size", str(state.vocabulary_size)),
        ("parameter change", state.parameter_change),
        ("device", state.device),
        ("GPU memory allocated (MiB)", allocated),
        ("GPU memory reserved (MiB)", reserved),
        ("enabled", "true" if state.enabled else "false"),
    )
    return Report(level, message, values)


def status_message(name: str, hardware_id: str, report: Report) -> DiagnosticStatus:
    return DiagnosticStatus(
        level=bytes([report.level]),
        name=name,
        message=report.message,
        hardware_id=hardware_id,
        values=[KeyValue(key=key, value=value) for key, value in report.values],
    )


def gpu_memory_mib(device: object) -> tuple[float, float] | None:
    """(allocated, reserved) MiB on a CUDA device as torch's allocator sees it, else None."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch  # only reached on CUDA, where the engine has imported it already

    return (
        torch.cuda.memory_allocated(device) / 2**20,
        torch.cuda.memory_reserved(device) / 2**20,
    )


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else NOT_AVAILABLE


def _max(values: Sequence[float]) -> str:
    return f"{max(values):.1f}" if values else NOT_AVAILABLE
