"""ovss-demo's side of the ROS graph: a camera publisher on the node's input topic, the node's
labels / overlay / label_info, and its parameter service (for the vocabulary change).

Every wait is for an event (a subscription matched, a message with the frame's stamp, a service
answer) with a limit; a frame that BEST_EFFORT loses after discovery is sent again, after 2, 4,
8... s (outputs are matched by stamp, so a repeat does no harm).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.srv import SetParameters
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vision_msgs.msg import LabelInfo

NODE = "/ovss"
INPUT_TOPIC = "/image"
SERVICE_TIMEOUT_S = 60.0
ATTEMPT_S = 5.0  # a parameter request without an answer is sent again after this
FIRST_RESEND_S = 2.0


class StartupError(Exception):
    """The node ended or never became ready; the message is its error line."""


@dataclass
class FrameResult:
    index: int
    name: str
    vocabulary: list[str] | None = None  # label_info of the frame's stamp; None: no output
    shares: list[tuple[str, float]] | None = None  # (class, pixel share), largest first
    latency_s: float = 0.0  # last publish -> labels received
    overlay: np.ndarray | None = None  # HxWx3 uint8 RGB


def _key(header: Header) -> tuple[int, int, str]:
    return (header.stamp.sec, header.stamp.nanosec, header.frame_id)


def label_array(message: Image) -> np.ndarray:
    """The HxW label values of a mono8 / mono16 ~/labels image."""
    dtype = np.uint8 if message.encoding == "mono8" else np.uint16
    array = np.frombuffer(bytes(message.data), dtype=dtype)
    if message.is_bigendian and dtype == np.uint16:
        array = array.byteswap()
    return array.reshape(message.height, message.step // np.dtype(dtype).itemsize)[
        :, : message.width
    ]


def pixel_shares(labels: np.ndarray, names: dict[int, str]) -> list[tuple[str, float]]:
    """(class name, share of the pixels) of every label value present, largest first; values
    outside ``names`` (255 / 65535) are 'unlabeled'."""
    values, counts = np.unique(labels, return_counts=True)
    shares = [
        (names.get(int(value), "unlabeled"), count / labels.size)
        for value, count in zip(values, counts, strict=True)
    ]
    return sorted(shares, key=lambda pair: -pair[1])


class Session:
    """The demo's rclpy node (its own context, no rclpy signal handlers: Ctrl-C raises
    KeyboardInterrupt in the demo, which then stops the node process)."""

    def __init__(
        self,
        startup_timeout: float,
        node_status: Callable[[], int | None],
        node_error: Callable[[], str],
    ) -> None:
        rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
        self.node = Node("ovss_demo")
        self.startup_timeout = startup_timeout
        self.node_status = node_status
        self.node_error = node_error
        self.received: dict[str, dict[tuple[int, int, str], Any]] = {
            "labels": {},
            "overlay": {},
            "label_info": {},
        }
        self.arrival: dict[tuple[int, int, str], float] = {}
        self.publisher = self.node.create_publisher(Image, INPUT_TOPIC, qos_profile_sensor_data)
        reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=20,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        for topic, kind, qos in (
            ("labels", Image, reliable),
            ("overlay", Image, reliable),
            ("label_info", LabelInfo, latched),
        ):
            self.node.create_subscription(kind, f"{NODE}/{topic}", self._keeper(topic), qos)
        self.set_client = self.node.create_client(SetParameters, f"{NODE}/set_parameters")

    def _keeper(self, topic: str) -> Callable[[Any], None]:
        def keep(message: Any) -> None:
            key = _key(message.header)
            self.received[topic][key] = message
            if topic == "labels":
                self.arrival.setdefault(key, time.monotonic())

        return keep

    def _spin_until(
        self, done: Callable[[], Any], limit: float, on_timeout: Callable[[], Any]
    ) -> Any:
        deadline = time.monotonic() + limit
        while not (value := done()):
            if self.node_status() is not None:
                raise StartupError(self.node_error())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return on_timeout()
            rclpy.spin_once(self.node, timeout_sec=min(0.05, remaining))
        return value

    def wait_ready(self) -> None:
        """Until the node subscribes to the input and its latched label_info is in."""

        def timeout() -> None:
            raise StartupError(
                f"not ready within {self.startup_timeout:g} s ({self.node_error()})"
            )

        self._spin_until(
            lambda: self.publisher.get_subscription_count() > 0 and self.received["label_info"],
            self.startup_timeout,
            timeout,
        )

    def wait(self, until: float) -> None:
        """Spin (pace the frames) until the monotonic time ``until``."""
        while (remaining := until - time.monotonic()) > 0:
            rclpy.spin_once(self.node, timeout_sec=min(0.05, remaining))

    def play(self, index: int, name: str, rgb: np.ndarray, timeout: float) -> FrameResult:
        """Publish one frame (again after 2, 4, 8... s without its labels) and wait up to
        ``timeout`` s for its labels, overlay and label_info."""
        header = Header(stamp=self.node.get_clock().now().to_msg(), frame_id=f"demo_{index}")
        height, width = rgb.shape[:2]
        message = Image(
            header=header,
            height=height,
            width=width,
            encoding="rgb8",
            is_bigendian=0,
            step=width * 3,
            data=np.ascontiguousarray(rgb).tobytes(),
        )
        key = _key(header)
        result = FrameResult(index, name)
        deadline = time.monotonic() + timeout
        wait = FIRST_RESEND_S
        sent = 0.0
        while time.monotonic() < deadline:
            sent = time.monotonic()
            self.publisher.publish(message)
            limit = min(wait, deadline - sent)
            if self._spin_until(lambda: key in self.received["labels"], limit, lambda: False):
                break
            wait *= 2
        if key not in self.received["labels"]:
            return result
        complete = self._spin_until(
            lambda: all(key in self.received[t] for t in ("overlay", "label_info")),
            max(1.0, deadline - time.monotonic()),
            lambda: False,
        )
        labels = self.received["labels"].pop(key)
        result.latency_s = self.arrival.pop(key) - sent
        info = self.received["label_info"].pop(key, None)
        if not complete or info is None:
            return result
        names = {entry.class_id: entry.class_name for entry in info.class_map}
        result.vocabulary = [names[i] for i in sorted(names)]
        result.shares = pixel_shares(label_array(labels), names)
        overlay = self.received["overlay"].pop(key)
        result.overlay = (
            np.frombuffer(bytes(overlay.data), np.uint8)
            .reshape(overlay.height, overlay.step)[:, : overlay.width * 3]
            .reshape(overlay.height, overlay.width, 3)
        )
        return result

    def set_classes(self, classes: list[str]) -> str | None:
        """Set the node's ``classes``; None when applied, else the node's reason."""
        request = SetParameters.Request(
            parameters=[Parameter("classes", value=list(classes)).to_parameter_msg()]
        )

        def timeout() -> None:
            raise StartupError(f"no parameter service within {SERVICE_TIMEOUT_S:g} s")

        self._spin_until(self.set_client.service_is_ready, SERVICE_TIMEOUT_S, timeout)
        deadline = time.monotonic() + SERVICE_TIMEOUT_S
        futures = []
        while time.monotonic() < deadline:
            futures.append(self.set_client.call_async(request))
            done = self._spin_until(
                lambda: next((f for f in futures if f.done()), None), ATTEMPT_S, lambda: None
            )
            if done is not None:
                result = done.result().results[0]
                if not result.successful:
                    return result.reason
                return self._wait_in_force(classes, deadline)
        return f"no answer from {NODE}/set_parameters within {SERVICE_TIMEOUT_S:g} s"

    def _wait_in_force(self, classes: list[str], deadline: float) -> str | None:
        """Until the node's label_info names ``classes``: an accepted vocabulary is prepared
        beside the frames, which keep the old one until it is in force (the node publishes
        label_info then)."""
        from ovss_ros.core.vocabulary import parse_classes

        wanted = [entry.name for entry in parse_classes(classes)]

        def in_force() -> bool:
            return any(
                [entry.class_name for entry in info.class_map] == wanted
                for info in self.received["label_info"].values()
            )

        if self._spin_until(in_force, max(1.0, deadline - time.monotonic()), lambda: False):
            return None
        return f"the vocabulary was accepted but not in force within {SERVICE_TIMEOUT_S:g} s"

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.try_shutdown()
