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
# An input with a matched publisher and no frame for this long gets a WARN (``InputWatch``).
SILENT_INPUT_S = 5.0
# Where the fix for frames lost in transport lives (installed as share/ovss_ros/config/...).
LARGE_DATA_PROFILE = "config/fastdds_large_data.xml"


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
    # Seconds the worker has been segmenting a frame of this camera; None: not segmenting.
    segmenting_s: float | None = None


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
        self._segmenting_since: float | None = None  # clock time the current forward began

    def start_segmenting(self) -> None:
        """The worker began segmenting a frame of this camera (the batch's forward pass)."""
        with self._lock:
            self._segmenting_since = self._clock()

    def stop_segmenting(self) -> None:
        """The worker's segmentation of this camera's frame ended (with a result or not)."""
        with self._lock:
            self._segmenting_since = None

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
                segmenting_s=_since(self._segmenting_since, now),
            )


@dataclass(frozen=True)
class InputState:
    """A camera's image subscription as the DDS graph shows it."""

    topic: str  # absolute name of the subscribed image topic
    publishers: int  # publishers matched with the subscription (QoS compatible)
    silent_s: float | None  # seconds with a matched publisher and no frame; None: no publisher


class InputWatch:
    """How long a camera's input has had a matched publisher but delivered no frame.

    A publisher that matches and sends frames that never arrive is what DDS does to frames
    larger than Fast DDS's default 512 KiB shared-memory segment under BEST_EFFORT: they go
    over fragmented UDP and are lost, and no counter of the node sees them. The silence is
    counted from the later of: the publisher appearing, the last frame received.
    Called from the diagnostics timer only (one thread).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: float | None = None  # start of the current silence
        self._received = -1

    def observe(self, topic: str, publishers: int, received: int) -> InputState:
        """The state now, given the matched publisher count and the total frames received."""
        now = self._clock()
        if publishers <= 0:
            self._since = None
        elif self._since is None or received != self._received:
            self._since = now
        self._received = received
        silent = None if self._since is None else now - self._since
        return InputState(topic, publishers, silent)


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
    # Other nodes in the graph with this node's fully qualified name (they share its topics).
    duplicate_nodes: int = 0
    node_name: str = ""  # fully qualified, for the duplicate-name message
    # Exceptions raised in callbacks (malformed requests, ...) since start-up and recently
    # (request_guard.CallbackFaults): the node went on after each.
    callback_errors: int = 0
    recent_callback_errors: int = 0


@dataclass(frozen=True)
class Report:
    """A status without ROS types: level (OK, WARN, ERROR), one-line message, key/values."""

    level: int
    message: str
    values: tuple[tuple[str, str], ...]

    def value(self, key: str) -> str:
        return dict(self.values)[key]


def silent_input_message(state: InputState) -> str:
    """The WARN for an input that has a matched publisher and delivers nothing, with the fix."""
    count = "1 publisher" if state.publishers == 1 else f"{state.publishers} publishers"
    return (
        f"no frame on {state.topic} for {state.silent_s:.0f} s although {count} matched: "
        "if the camera is sending (e.g. ros2 topic hz on its side), its frames are lost in "
        "transport (larger than the DDS shared-memory segment, with default Fast DDS "
        f"settings): set FASTDDS_DEFAULT_PROFILES_FILE to ovss_ros's "
        f"{LARGE_DATA_PROFILE} in the camera driver and this node, or make the input reliable "
        "(README: Large images and DDS)"
    )


def camera_report(
    window: Window, state: NodeState, input_state: InputState | None = None
) -> Report:
    """Level and message from what happened within the window; counters are cumulative.

    ERROR: inference failed for every frame it was tried on. WARN: some failed or were
    rejected or had an unusable stamp, frames arrive but none is segmented and none is in
    progress (all stale, or a stuck model), the last accepted parameter change failed, a matched
    input publisher sent nothing for SILENT_INPUT_S (the message names the fix), another node
    has this node's name, or a callback raised recently. OK otherwise; a model slower than the
    window says "segmenting a frame (N s so far)". While paused, the message starts with why.
    ``input_state`` given: the values also say the input topic, its matched publishers and
    seconds without a frame.
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
    busy = None
    if state.enabled and counts.received > counts.dropped_paused and unused:
        if window.segmenting_s is not None:
            # A model slower than the window: working, not stuck.
            busy = f"segmenting a frame ({window.segmenting_s:.0f} s so far)"
        else:
            stale = f", {counts.dropped_stale} too old" if counts.dropped_stale else ""
            problems.append((WARN, f"frames arrive but none was segmented{stale}"))
    if state.parameter_change_failed:
        problems.append((WARN, f"parameter change failed: {state.parameter_change}"))
    if (
        input_state is not None
        and input_state.silent_s is not None
        and input_state.silent_s >= SILENT_INPUT_S
    ):
        problems.append((WARN, silent_input_message(input_state)))
    if state.duplicate_nodes:
        problems.append((WARN, duplicate_node_message(state.node_name, state.duplicate_nodes)))
    if state.recent_callback_errors:
        problems.append(
            (
                WARN,
                f"{state.recent_callback_errors} request or callback errors in the last "
                f"{WINDOW_S:.0f} s (a malformed request?): answered or skipped, see the log",
            )
        )
    messages = [text for _, text in problems]
    if not state.enabled:
        messages.insert(0, state.not_enabled_reason)
    elif busy is not None:
        messages.insert(0, busy)
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
        ("segmenting for (s)", _seconds(window.segmenting_s)),
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
        ("callback errors", str(state.callback_errors)),
        ("device", state.device),
        ("GPU memory allocated (MiB)", allocated),
        ("GPU memory reserved (MiB)", reserved),
        ("enabled", "true" if state.enabled else "false"),
    )
    if input_state is not None:
        silent = input_state.silent_s
        values += (
            ("input topic", input_state.topic),
            ("input publishers", str(input_state.publishers)),
            ("seconds without a frame", NOT_AVAILABLE if silent is None else f"{silent:.1f}"),
        )
    return Report(level, message, values)


def duplicate_node_message(name: str, others: int) -> str:
    """The WARN for a node name that another node in the graph has too."""
    more = "another node" if others == 1 else f"{others} other nodes"
    return (
        f"{more} named {name} in the graph: they share this node's topics, services and "
        "parameters; give each a name or namespace of its own (-r __node:=... / -r __ns:=...)"
    )


def status_message(name: str, hardware_id: str, report: Report) -> DiagnosticStatus:
    return DiagnosticStatus(
        level=bytes([report.level]),
        name=name,
        message=report.message,
        hardware_id=hardware_id,
        values=[KeyValue(key=key, value=value) for key, value in report.values],
    )


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else NOT_AVAILABLE


def _max(values: Sequence[float]) -> str:
    return f"{max(values):.1f}" if values else NOT_AVAILABLE


def _since(start: float | None, now: float) -> float | None:
    return None if start is None else now - start


def _seconds(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.1f}"
