"""Frame accounting of the node: every received frame gets exactly one outcome, counted once.

A ``Frame`` is a received message, its camera, when it arrived, and where it is in its life:
``waiting`` (in the newest-frame slot or being segmented), ``publishing`` (claimed by the worker:
pausing no longer drops it), then its one outcome (``diagnostics.OUTCOMES``). ``FrameLedger``
holds the frames without an outcome under one lock, so the executor thread (admit, pause) and the
worker thread (claim, settle) never count a frame twice or not at all; each camera's
``CameraStats`` gets the counts (``diagnostics``: received = outcomes + in progress).

Also here: the age of a frame from its header stamp against the node's clock (ROS time, so
simulated time under ``use_sim_time``), with what a stamp that gives no age is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rclpy.clock import Clock
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ovss_ros.ros.diagnostics import OUTCOMES

if TYPE_CHECKING:
    from ovss_ros.ros.cameras import Camera

# A header stamp later than now by more than this (a camera whose clock runs ahead) gives the
# frame no age: never stale, no latency sample, counted as an unusable stamp. A stamp ahead by
# less (clock skew of synchronised machines, a /clock published at a few Hz in simulation)
# counts as taken now: age 0.
FUTURE_STAMP_TOLERANCE_S = 0.5


@dataclass(eq=False)
class Frame:
    """A received message, its camera, when it arrived, and where it is in its life.

    ``state``: ``waiting`` (in the newest-frame slot or being segmented), ``publishing``
    (claimed by the worker: pausing no longer drops it), then its one outcome
    (``diagnostics.OUTCOMES``), counted once.
    """

    camera: Camera
    message: Image | CompressedImage
    received: Time
    state: str = "waiting"
    age_known: bool = True  # False: its stamp gives no age (``stamp_problem``)


class FrameLedger:
    """The frames received and without an outcome, and each camera's newest: one lock for all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[Frame] = set()
        self._newest: dict[str, Frame] = {}

    def admit(
        self, camera: Camera, message: Image | CompressedImage, received: Time
    ) -> tuple[Frame, Frame | None]:
        """Count a frame received and hold it until it has an outcome; return it and the frame
        this camera admitted before it."""
        frame = Frame(camera, message, received)
        camera.stats.receive()
        with self._lock:
            self._held.add(frame)
            previous, self._newest[camera.name] = self._newest.get(camera.name), frame
        return frame, previous

    def settle(
        self,
        frame: Frame,
        outcome: str,
        inference_s: float | None = None,
        latency_s: float | None = None,
    ) -> bool:
        """Give ``frame`` its one outcome; False (nothing counted) if it has one already."""
        with self._lock:
            if frame.state in OUTCOMES:
                return False
            frame.state = outcome
            self._held.discard(frame)
        frame.camera.stats.settle(outcome, inference_s, latency_s)
        return True

    def claim(self, frame: Frame) -> bool:
        """Mark a segmented frame as being published; False if it was dropped meanwhile."""
        with self._lock:
            if frame.state != "waiting":
                return False
            frame.state = "publishing"
            return True

    def drop_waiting(self) -> None:
        """Pausing or stopping: the frames waiting are dropped, and counted as such (a frame
        already being published is not: it is counted when it is out)."""
        with self._lock:
            dropped = [frame for frame in self._held if frame.state == "waiting"]
            for frame in dropped:
                frame.state = "dropped_paused"
                self._held.discard(frame)
        for frame in dropped:
            frame.camera.stats.settle("dropped_paused")


def stamp_usable(stamp: Any) -> bool:
    """Whether a builtin_interfaces/Time is a time: sec >= 0 (rclpy refuses negative times) and
    nanosec below one second. A frame whose stamp is not gets "age unknown": it is never stale
    and gives no latency sample, and it is segmented and published with its header as sent."""
    return stamp.sec >= 0 and stamp.nanosec < 1_000_000_000


def stamp_problem(stamp: Any, clock: Clock) -> str | None:
    """Why a header stamp gives no age, or None when it does (or the frame is unstamped):
    it is no time (``stamp_usable``), or it is more than FUTURE_STAMP_TOLERANCE_S later
    than now (the camera's clock runs ahead of this node's)."""
    if not stamp_usable(stamp):
        return f"is no time (sec {stamp.sec}, nanosec {stamp.nanosec})"
    age = age_of(stamp, clock)
    if age is not None and age < -FUTURE_STAMP_TOLERANCE_S:
        return (
            f"is {-age:.3f} s later than now (the camera's clock runs ahead of this "
            f"node's by more than the {FUTURE_STAMP_TOLERANCE_S} s tolerated)"
        )
    return None


def frame_age(header: Header, clock: Clock) -> float | None:
    """Seconds from the header stamp to now, at least 0; None when the age is unknown: an
    unstamped frame (zero stamp), a stamp that is no time (``stamp_usable``) or one more
    than FUTURE_STAMP_TOLERANCE_S in the future (a stamp ahead by less counts as now)."""
    age = age_of(header.stamp, clock)
    if age is None or age < -FUTURE_STAMP_TOLERANCE_S:
        return None
    return max(age, 0.0)


def age_of(stamp: Any, clock: Clock) -> float | None:
    """Seconds from ``stamp`` to now, negative for a stamp in the future; None for an
    unstamped frame or a stamp that is no time."""
    if (stamp.sec == 0 and stamp.nanosec == 0) or not stamp_usable(stamp):
        return None
    try:
        time_of_stamp = Time.from_msg(stamp, clock_type=clock.clock_type)
    except (ValueError, OverflowError, TypeError):
        return None
    return (clock.now() - time_of_stamp).nanoseconds * 1e-9
