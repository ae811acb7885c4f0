"""Helpers for tests that attack the node over DDS from another process (issue 18).

- ``FrameStream``: a camera driver in a thread of its own, publishing frames at a fixed rate
  (RELIABLE, deep history, so that every frame sent reaches the node) while the test's main
  thread changes parameters or sends malformed requests.
- ``raw_set_request`` and friends: rcl_interfaces requests built field by field, as any process
  on the graph can send them (rclpy's typed helpers would refuse to build some of them).
- ``accounting``: the frame accounting of a /diagnostics status, checked the way
  test/test_node_accounting.py checks it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from rcl_interfaces.msg import Parameter as ParameterMessage
from rcl_interfaces.msg import ParameterValue
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import make_image, status_values
from sensor_msgs.msg import Image
from std_msgs.msg import Header

# Deep enough that no frame is replaced in a history before the node's callback takes it, even
# while its executor is busy for seconds on a loaded machine.
STREAM_DEPTH = 1000
OUTCOME_KEYS = (
    "frames processed",
    "frames dropped (paused)",
    "frames dropped (stale)",
    "frames dropped (overwritten)",
    "frames rejected",
    "frames failed",
)


def stream_qos() -> QoSProfile:
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=STREAM_DEPTH,
        reliability=ReliabilityPolicy.RELIABLE,
    )


def deep_qos(depth: int = STREAM_DEPTH) -> QoSProfile:
    """RELIABLE with a deep history: for service clients that send many requests at once (the
    default client history of 10 would drop answers not taken in time)."""
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def reliable_input_overrides(topic: str = "/image") -> list[str]:
    """``--ros-args`` that make the node's image subscription RELIABLE with a deep history."""
    prefix = f"qos_overrides.{topic}.subscription"
    return [
        "-p",
        f"{prefix}.reliability:=reliable",
        "-p",
        f"{prefix}.depth:={STREAM_DEPTH}",
    ]


class FrameStream:
    """Publishes ``rgb`` at ``rate_hz`` on ``topic`` from its own thread and node (a camera).

    Each frame has a header of its own (stamp now, frame_id ``stream_<n>``); ``sent`` counts
    them. Use as a context manager: the thread stops on the way out.
    """

    def __init__(self, rgb: np.ndarray, rate_hz: float, topic: str = "/image") -> None:
        self._rgb = np.ascontiguousarray(rgb)
        self._period = 1.0 / rate_hz
        self._node = Node("ovss_test_camera")
        self._publisher = self._node.create_publisher(Image, topic, stream_qos())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test_camera", daemon=True)
        self.sent = 0

    def matched(self) -> bool:
        return self._publisher.get_subscription_count() > 0

    def _run(self) -> None:
        next_time = time.monotonic()
        while not self._stop.is_set():
            header = Header(
                stamp=self._node.get_clock().now().to_msg(), frame_id=f"stream_{self.sent}"
            )
            self._publisher.publish(make_image(self._rgb, "rgb8", header))
            self.sent += 1
            next_time += self._period
            # A camera's rate, not a wait for an event: the stop event ends it at once.
            self._stop.wait(max(0.0, next_time - time.monotonic()))

    def stop(self) -> None:
        """Stop sending (``sent`` is final then); the node stays until the context ends."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> FrameStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._node.destroy_node()


def raw_value(type_id: int, **fields: Any) -> ParameterValue:
    """An rcl_interfaces/ParameterValue with any ``type`` byte (0-255) and any fields set."""
    value = ParameterValue()
    value.type = type_id
    for name, field in fields.items():
        setattr(value, name, field)
    return value


def raw_parameter(name: str, type_id: int, **fields: Any) -> ParameterMessage:
    return ParameterMessage(name=name, value=raw_value(type_id, **fields))


def accounting(values: dict[str, str]) -> tuple[int, int]:
    """(received, processed + dropped + rejected + failed + in progress) of a status."""
    outcomes = sum(int(values[key]) for key in OUTCOME_KEYS)
    return int(values["frames received"]), outcomes + int(values["frames in progress"])


def settled_status(client: Any, name: str, sent: int, timeout: float = 240.0) -> dict[str, str]:
    """Wait for a status of ``name`` with all ``sent`` frames received and none in progress;
    return its values (the caller checks the sum)."""
    status = client.wait_for_status(
        name,
        lambda values: (
            int(values["frames received"]) >= sent and values["frames in progress"] == "0"
        ),
        timeout,
    )
    return status_values(status)
