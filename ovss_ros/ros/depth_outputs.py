"""Labels in 3D on the node: depth inputs, colour/depth pairing, ``~/points`` and ``~/objects``.

With parameter ``depth.enabled`` each camera also reads ``depth/image`` (sensor_msgs/Image 16UC1
millimetres or 32FC1 metres, registered to the colour image: same size, same intrinsics) and
``depth/camera_info`` (camera ``front``: ``front/depth/image``, ...), and publishes ``~/points``
(sensor_msgs/PointCloud2: x, y, z, label, confidence) and ``~/objects``
(visualization_msgs/MarkerArray: a sphere and a name per class region), both with the colour
frame's header. The messages are made in ``depth_points``, the geometry in
``core.depth_geometry``.

Threads: the executor's callbacks only check a depth image's header (encoding, pixel count) and
queue it by stamp (``stamp_pairing.StampPairer``: ``depth.queue_size`` newest); after the worker
has published a colour frame's labels it asks for the queued depth image paired with that
frame's stamp (within ``depth.slop``) and builds the outputs. Lazy: while neither output has a
subscriber nothing is paired, converted or computed (counted as ``frames unwatched``).

Every refusal is counted per camera and shown on /diagnostics (status ``<node>: <camera> depth``)
with its reason, logged at most once in LOG_THROTTLE_S per kind, and costs only that frame's 3D
outputs: never the labels, never the node. Kinds: a depth encoding other than 16UC1/32FC1, a
depth image over ``max_input_pixels``, a colour frame without depth within ``depth.slop``, no or
unusable camera_info, depth of another size than the colour frame, depth data that does not
match its header.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.subscription import Subscription
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from visualization_msgs.msg import MarkerArray

from ovss_ros.core import Segmentation
from ovss_ros.core.depth_geometry import DEPTH_ENCODINGS, DepthError, check_sizes, class_regions
from ovss_ros.ros.cameras import sensor_qos
from ovss_ros.ros.depth_points import (
    camera_intrinsics,
    depth_image_metres,
    object_markers,
    point_cloud,
)
from ovss_ros.ros.depth_settings import DepthSettings
from ovss_ros.ros.frames import stamp_problem
from ovss_ros.ros.log_text import KindThrottle, describe, one_line
from ovss_ros.ros.stamp_pairing import StampPairer, stamp_ns
from ovss_ros.ros.topic_names import check_node_topics

if TYPE_CHECKING:
    from ovss_ros.ros.cameras import Camera
    from ovss_ros.ros.frames import Frame
    from ovss_ros.ros.parameters import Settings

LOG_THROTTLE_S = 5.0
INPUT_TOPICS = ("depth/image", "depth/camera_info")
OUTPUT_TOPICS = ("points", "objects")
# Diagnostics counters (key/values of the depth status), in the order shown.
COUNTERS = (
    "depth received",
    "clouds published",
    "objects published",
    "frames unwatched",
    "frames unpaired",
    "depth wrong encoding",
    "depth too large",
    "depth unusable stamp",
    "depth size mismatch",
    "depth unreadable",
    "camera_info missing",
    "camera_info unusable",
    "depth failed",
)
REFUSALS = frozenset(COUNTERS[4:])


class DepthRefused(Exception):
    """One frame's 3D outputs refused: ``kind`` (a COUNTERS key) and the reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass
class _Outputs:
    points: Publisher
    objects: Publisher


class DepthCamera:
    """One camera's depth input, pairing, outputs and counters."""

    def __init__(self, camera: Camera, queue_size: int, slop: float) -> None:
        self.camera = camera
        prefix = camera.output_prefix  # "~/" or "~/front/"
        self.inputs = "" if prefix == "~/" else prefix[2:]
        self.output_prefix = prefix
        self.pairer: StampPairer[None, Image] = StampPairer(slop, queue_size)
        self.lock = threading.Lock()  # the pairer and the counters: executor and worker
        self.counts: Counter[str] = Counter()
        self.reported: Counter[str] = Counter()  # the counts at the last diagnostics report
        self.last_refusal = ""
        self.reasons: dict[str, str] = {}  # refusal kind -> its newest reason
        self.info: CameraInfo | None = None
        self.outputs: _Outputs | None = None
        self.subscriptions: list[Subscription] = []

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    def topics(self) -> list[str]:
        return [self.inputs + t for t in INPUT_TOPICS] + [
            self.output_prefix + t for t in OUTPUT_TOPICS
        ]


class DepthOutputs:
    """The node's 3D outputs (module docstring); every step a no-op unless ``depth.enabled``.

    ``settings``: the node's settings in force (read at each frame: ``depth.*`` settings that
    change at runtime take effect on the next frame, as the node's other settings do). Steps
    in lifecycle order: ``setup`` (check topic names, diagnostics), ``open`` (publishers),
    ``subscribe``, ``unsubscribe``, ``close``; ``publish`` runs on the worker thread after a
    frame's labels are out.
    """

    def __init__(self, node: Node) -> None:
        self._node = node
        self._settings: Callable[[], Settings] | None = None
        self.cameras: list[DepthCamera] = []
        self._warnings = KindThrottle(LOG_THROTTLE_S)

    def setup(self, cameras: Any, settings: Callable[[], Settings]) -> None:
        """Check the depth topics of ``cameras`` (CameraSet) as the node resolves them (raises
        ParameterError) and start the depth diagnostics. Nothing when depth is not enabled."""
        self._settings = settings
        settings = self.settings()
        if not settings.enabled:
            return
        self.cameras = [DepthCamera(c, settings.queue_size, settings.slop) for c in cameras]
        topics = [topic for depth in self.cameras for topic in depth.topics()]
        check_node_topics(topics, self._node.resolve_topic_name, what="depth.enabled")

    def settings(self) -> DepthSettings:
        return self._settings().depth if self._settings is not None else DepthSettings()

    def open(self) -> None:
        for depth in self.cameras:
            depth.outputs = _Outputs(
                points=self._node.create_publisher(PointCloud2, depth.output_prefix + "points", 5),
                objects=self._node.create_publisher(
                    MarkerArray, depth.output_prefix + "objects", 5
                ),
            )

    def close(self) -> None:
        """Destroy the outputs: after the worker has stopped (nothing publishes on them)."""
        for depth in self.cameras:
            outputs, depth.outputs = depth.outputs, None
            if outputs is not None:
                self._node.destroy_publisher(outputs.points)
                self._node.destroy_publisher(outputs.objects)

    def subscribe(self) -> None:
        for depth in self.cameras:
            depth.subscriptions = [
                self._node.create_subscription(
                    Image, depth.inputs + "depth/image", self._on_depth(depth), sensor_qos(depth=5)
                ),
                self._node.create_subscription(
                    CameraInfo,
                    depth.inputs + "depth/camera_info",
                    lambda message, depth=depth: setattr(depth, "info", message),
                    sensor_qos(depth=5),
                ),
            ]

    def unsubscribe(self) -> None:
        for depth in self.cameras:
            for subscription in depth.subscriptions:
                self._node.destroy_subscription(subscription)
            depth.subscriptions = []
            with depth.lock:
                depth.pairer.clear()

    # Executor thread: header checks and queueing only.

    def _on_depth(self, depth: DepthCamera) -> Callable[[Image], None]:
        def on_depth(message: Image) -> None:
            depth.count("depth received")
            try:
                self._check_header(message)
            except DepthRefused as refusal:
                self._refuse(depth, refusal)
                return
            with depth.lock:
                depth.pairer.add_second(stamp_ns(message.header), message)

        return on_depth

    def _check_header(self, message: Image) -> None:
        if message.encoding not in DEPTH_ENCODINGS:
            raise DepthRefused(
                "depth wrong encoding",
                f"depth encoding {message.encoding!r} is not supported: use 16UC1 (millimetres) "
                "or 32FC1 (metres)",
            )
        problem = stamp_problem(message.header.stamp, self._node.get_clock())
        if problem is not None:  # queued, a stamp far ahead would outlive every later image
            raise DepthRefused("depth unusable stamp", f"depth stamp {problem}")
        limit = self._settings().max_input_pixels
        pixels = int(message.width) * int(message.height)
        if pixels > limit:
            raise DepthRefused(
                "depth too large",
                f"depth image {message.width}x{message.height} has {pixels} pixels, over "
                f"max_input_pixels {limit}",
            )

    # Worker thread.

    def publish(self, frame: Frame, segmentation: Segmentation) -> None:
        """The 3D outputs of a frame whose labels are out: only those with a subscriber. Never
        raises: a refusal or an error is counted and costs only this frame's 3D outputs."""
        depth = self._depth_of(frame.camera)
        if depth is None or depth.outputs is None:
            return
        outputs = depth.outputs
        points = outputs.points.get_subscription_count() > 0
        objects = outputs.objects.get_subscription_count() > 0
        if not (points or objects):
            depth.count("frames unwatched")
            return
        try:
            self._publish(depth, outputs, frame, segmentation, points, objects)
        except DepthRefused as refusal:
            self._refuse(depth, refusal)
        except Exception as error:
            self._refuse(depth, DepthRefused("depth failed", describe(error)), error=True)

    def _publish(
        self,
        depth: DepthCamera,
        outputs: _Outputs,
        frame: Frame,
        segmentation: Segmentation,
        points: bool,
        objects: bool,
    ) -> None:
        settings = self.settings()
        header = frame.message.header
        with depth.lock:
            depth.pairer.set_slop(settings.slop)
            message = depth.pairer.match_first(stamp_ns(header))
        if message is None:
            raise DepthRefused(
                "frames unpaired",
                f"no depth image within depth.slop {settings.slop} s of the colour frame "
                f"stamped {header.stamp.sec}.{header.stamp.nanosec:09d}",
            )
        info = depth.info
        if info is None:
            raise DepthRefused(
                "camera_info missing",
                f"no message on {depth.inputs}depth/camera_info yet: the depth image's "
                "intrinsics are needed",
            )
        try:
            k = camera_intrinsics(info)
        except DepthError as error:
            raise DepthRefused("camera_info unusable", str(error)) from None
        labels = segmentation.labels
        try:
            check_sizes((int(message.height), int(message.width)), labels.shape, k)
        except DepthError as error:
            raise DepthRefused("depth size mismatch", str(error)) from None
        try:
            metres = depth_image_metres(message, max_pixels=labels.size)
        except DepthError as error:
            raise DepthRefused("depth unreadable", str(error)) from None
        if points:
            outputs.points.publish(
                point_cloud(
                    header,
                    metres,
                    k,
                    labels,
                    segmentation.confidence,
                    organised=settings.organised,
                    max_points=settings.max_points,
                )
            )
            depth.count("clouds published")
        if objects:
            regions = class_regions(
                labels,
                metres,
                k,
                min_pixels=settings.min_region_pixels,
                max_per_class=settings.max_regions_per_class,
            )
            names = segmentation.class_names
            colours = depth.camera.colours.colours(names) if names else None
            outputs.objects.publish(
                object_markers(
                    header,
                    regions,
                    names,
                    max_per_class=settings.max_regions_per_class,
                    colours=colours,
                )
            )
            depth.count("objects published")

    def _depth_of(self, camera: Camera) -> DepthCamera | None:
        for depth in self.cameras:
            if depth.camera is camera:
                return depth
        return None

    def _refuse(self, depth: DepthCamera, refusal: DepthRefused, error: bool = False) -> None:
        """Count a refusal, keep its reason for diagnostics, log it once in a while per kind."""
        reason = one_line(str(refusal))
        with depth.lock:
            depth.counts[refusal.kind] += 1
            depth.last_refusal = f"{refusal.kind}: {reason}"
            depth.reasons[refusal.kind] = reason
        if self._warnings.due((depth.camera.name, refusal.kind)):
            text = f"camera {depth.camera.name}: no 3D outputs ({refusal.kind}): {reason}"
            if error:
                self._node.get_logger().error(text)
            else:
                self._node.get_logger().warning(text)

    # Executor thread: diagnostics.

    def statuses(self) -> list[DiagnosticStatus]:
        """Each camera's depth status, for the node's /diagnostics (``NodeDiagnostics``); none
        when depth is not enabled."""
        return [self.status(depth) for depth in self.cameras]

    def status(self, depth: DepthCamera) -> DiagnosticStatus:
        """The camera's depth status: WARN with each kind of refusal that grew since the last
        report and its newest reason; else OK with what was published."""
        with depth.lock:
            counts = Counter(depth.counts)
            grown = [k for k in COUNTERS if k in REFUSALS and counts[k] > depth.reported[k]]
            depth.reported = counts
            last = depth.last_refusal
            reasons = [f"{kind}: {depth.reasons.get(kind, '')}" for kind in grown]
        if grown:
            level, message = DiagnosticStatus.WARN, "; ".join(reasons)
        else:
            level = DiagnosticStatus.OK
            message = f"{counts['clouds published']} clouds, {counts['objects published']} objects"
        values = [KeyValue(key=k, value=str(counts[k])) for k in COUNTERS]
        values.append(KeyValue(key="last refusal", value=last))
        return DiagnosticStatus(
            level=level,
            name=f"{self._node.get_name()}: {depth.camera.name} depth",
            message=message,
            hardware_id="ovss_ros",
            values=values,
        )
