"""The node's cameras: input subscriptions, output publishers, their QoS, and the mask topics.

The single camera (parameter ``cameras`` empty) keeps the plain contract: it reads ``image`` and
``camera_info`` and publishes ``~/labels``, ``~/label_info``, ``~/overlay``, ``~/confidence``,
``~/camera_info`` and ``~/masks/<class>``; camera ``front`` reads ``front/image`` and publishes
``~/front/labels`` and so on (contract: docs/ros_interface.md). Inputs are sensor-data QoS (best
effort, newest only); outputs are reliable and shallow, ``~/label_info`` latched, and every output
QoS can be overridden per topic (``qos_overrides.<topic>.publisher.*``). The mask topics follow
the vocabulary: one per class, made and unmade one at a time on the executor's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSPolicyKind,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.subscription import Subscription
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from vision_msgs.msg import LabelInfo

from ovss_ros.core import ClassColours, ClassEntry, Segmentation, overlay
from ovss_ros.ros.diagnostics import CameraStats, InputState, InputWatch
from ovss_ros.ros.image_conversion import (
    float32_to_image,
    mono8_to_image,
    mono16_to_image,
    rgb8_to_image,
)
from ovss_ros.ros.label_info import label_info
from ovss_ros.ros.log_text import describe, quoted
from ovss_ros.ros.parameters import Settings
from ovss_ros.ros.topic_names import check_mask_topics, check_node_topics, mask_topic

SINGLE_CAMERA = "image"  # the single camera's name in diagnostics: "ovss: image"
OUTPUT_TOPICS = ("labels", "label_info", "overlay", "confidence", "camera_info")


def sensor_qos(depth: int = 1) -> QoSProfile:
    """Sensor data QoS: best effort, newest only. A fresh object each time: QoS overrides
    modify the profile they are given, which must not leak into other entities."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.VOLATILE,
    )


def output_qos() -> QoSProfile:
    """Outputs: reliable so that RViz / rqt_image_view (reliable by default) and best-effort
    subscribers both match; shallow so that a slow subscriber does not hold old frames."""
    return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


def label_info_qos() -> QoSProfile:
    """Latched: a late subscriber still learns what the label values mean."""
    return QoSProfile(
        depth=1,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )


# Every policy a subscriber's match depends on can be overridden per output topic, e.g.
# qos_overrides./ovss/labels.publisher.reliability: best_effort.
OUTPUT_QOS_OVERRIDES = QoSOverridingOptions(
    policy_kinds=(
        QoSPolicyKind.HISTORY,
        QoSPolicyKind.DEPTH,
        QoSPolicyKind.RELIABILITY,
        QoSPolicyKind.DURABILITY,
    )
)


@dataclass
class Outputs:
    """A camera's publishers, from configure (or start-up) to cleanup (or shutdown)."""

    labels: Publisher
    label_info: Publisher
    overlay: Publisher
    confidence: Publisher
    camera_info: Publisher
    mask_qos: QoSProfile  # that of ~/labels after its overrides: the masks follow it
    masks: dict[str, Publisher]  # class name -> ~/masks/<slug>


class Camera:
    """One input stream and its outputs; all cameras share the node's one Segmenter.

    The single camera (parameter ``cameras`` empty) keeps the plain contract: it reads ``image``
    and ``camera_info`` and publishes ``~/labels`` and so on. Camera ``front`` reads
    ``front/image`` and ``front/camera_info`` and publishes ``~/front/labels`` and so on.
    """

    def __init__(self, name: str | None = None, colours: ClassColours | None = None) -> None:
        self.name = name or SINGLE_CAMERA
        self.colours = colours or ClassColours()  # the node's: one colour per class name
        self._inputs = f"{name}/" if name else ""
        self.output_prefix = f"~/{name}/" if name else "~/"
        self.stats = CameraStats()
        self.input_watch = InputWatch()
        self.silence_logged = False  # the current silence of the input has been logged
        self.frame_id = ""  # of its newest frame: label_info sent on a vocabulary change has it
        self.outputs: Outputs | None = None
        self._subscriptions: list[Subscription] = []

    def open_outputs(self, node: Node) -> None:
        def publisher(message_type: type, topic: str, qos: QoSProfile) -> Publisher:
            return node.create_publisher(
                message_type,
                self.output_prefix + topic,
                qos,
                qos_overriding_options=OUTPUT_QOS_OVERRIDES,
            )

        labels_qos = output_qos()
        self.outputs = Outputs(
            labels=publisher(Image, "labels", labels_qos),
            label_info=publisher(LabelInfo, "label_info", label_info_qos()),
            overlay=publisher(Image, "overlay", output_qos()),
            confidence=publisher(Image, "confidence", output_qos()),
            camera_info=publisher(CameraInfo, "camera_info", output_qos()),
            # Mask topics come and go with the vocabulary (made on the executor's thread for the
            # worker: ExecutorWork): one QoS for all of them (set through ~/labels) declares no
            # parameters on the way.
            mask_qos=labels_qos,
            masks={},
        )

    def close_outputs(self, node: Node) -> None:
        outputs, self.outputs = self.outputs, None
        if outputs is None:
            return
        for publisher in (
            outputs.labels,
            outputs.label_info,
            outputs.overlay,
            outputs.confidence,
            outputs.camera_info,
            *outputs.masks.values(),
        ):
            node.destroy_publisher(publisher)
        outputs.masks.clear()

    def update_masks(self, node: Node, wanted: Mapping[str, str]) -> None:
        """One ~/masks/<slug> publisher per entry of ``wanted`` (class name -> slug), no other.
        On the executor's thread only (``mask_steps``)."""
        for _ in self.mask_steps(node, wanted):
            pass

    def mask_steps(self, node: Node, wanted: Mapping[str, str]) -> Iterator[None]:
        """``update_masks`` one publisher at a time: each step destroys or creates one, so the
        executor can serve other callbacks in between (``ExecutorWork``). Run on the executor's
        thread: rclpy entities are made and unmade there only.

        Each class on its own: a mask topic that cannot be created (validation should have
        refused its name) is logged and skipped, and costs no other class its mask, nor the
        camera its labels and label_info.
        """
        outputs = self.outputs
        if outputs is None:
            return
        topics = {}
        for name, slug in wanted.items():
            try:
                topics[name] = node.resolve_topic_name(mask_topic(self.output_prefix, slug))
            except Exception as error:
                self._mask_error(node, name, error)
        for name in list(outputs.masks):
            if self.outputs is not outputs:  # closed meanwhile (a job that was cancelled)
                return
            if outputs.masks[name].topic_name != topics.get(name):
                node.destroy_publisher(outputs.masks.pop(name))
                yield
        for name, topic in topics.items():
            if self.outputs is not outputs:
                return
            if name in outputs.masks:
                continue
            try:
                outputs.masks[name] = node.create_publisher(Image, topic, outputs.mask_qos)
            except Exception as error:
                self._mask_error(node, name, error)
            yield

    def _mask_error(self, node: Node, name: str, error: Exception) -> None:
        node.get_logger().error(
            f"camera {self.name}: no mask topic for class {quoted(name)}: {describe(error)}"
        )

    def subscribe(
        self,
        node: Node,
        transport: str,
        on_image: Callable[[Camera, Image | CompressedImage], None],
    ) -> None:
        if transport == "compressed":
            # Like image_transport: the compressed topic hangs below the (remapped) image topic.
            topic = node.resolve_topic_name(self._inputs + "image") + "/compressed"
            message_type: type = CompressedImage
        else:
            topic, message_type = self._inputs + "image", Image
        self._subscriptions = [
            node.create_subscription(
                message_type,
                topic,
                lambda message: on_image(self, message),
                sensor_qos(depth=1),
                qos_overriding_options=QoSOverridingOptions.with_default_policies(),
            ),
            node.create_subscription(
                CameraInfo, self._inputs + "camera_info", self._on_camera_info, sensor_qos(5)
            ),
        ]

    def unsubscribe(self, node: Node) -> None:
        for subscription in self._subscriptions:
            node.destroy_subscription(subscription)
        self._subscriptions = []
        self.input_watch = InputWatch()
        self.silence_logged = False

    def input_state(self) -> InputState | None:
        """The image subscription's matched publishers and silence; None while unsubscribed."""
        if not self._subscriptions:
            return None
        image = self._subscriptions[0]
        return self.input_watch.observe(
            image.topic_name, image.get_publisher_count(), self.stats.totals.received
        )

    def _on_camera_info(self, message: CameraInfo) -> None:
        # Every output has the input's width and height (labels are upsampled to the input size),
        # so the camera model applies unchanged: no scaling of K, P or the ROI needed.
        if self.outputs is not None:
            self.outputs.camera_info.publish(message)

    def publish(
        self,
        rgb: np.ndarray,
        segmentation: Segmentation,
        header: Header,
        settings: Settings,
        threshold: float,
    ) -> None:
        """Publish one frame's results with the frame's header; lazy outputs only if watched."""
        outputs = self.outputs
        if outputs is None:
            return
        # label_info first, with the frame's header: a consumer holding a labels frame can
        # always find the vocabulary that produced it.
        outputs.label_info.publish(label_info(header, segmentation.class_names, threshold))
        labels = segmentation.labels
        to_image = mono16_to_image if labels.dtype == np.uint16 else mono8_to_image
        outputs.labels.publish(to_image(labels, header))
        for index, name in enumerate(segmentation.class_names):
            publisher = outputs.masks.get(name)
            if publisher is not None and publisher.get_subscription_count() > 0:
                mask = segmentation.mask(index).astype(np.uint8) * np.uint8(255)
                publisher.publish(mono8_to_image(mask, header))
        if settings.publish_overlay and outputs.overlay.get_subscription_count() > 0:
            blended = overlay(
                rgb, segmentation, settings.overlay_alpha, self.colours, settings.overlay_legend
            )
            outputs.overlay.publish(rgb8_to_image(blended, header))
        if settings.publish_confidence and outputs.confidence.get_subscription_count() > 0:
            outputs.confidence.publish(float32_to_image(segmentation.confidence, header))

    def publish_label_info(self, header: Header, class_names: list[str], threshold: float) -> None:
        if self.outputs is not None:
            self.outputs.label_info.publish(label_info(header, class_names, threshold))


class CameraSet:
    """The node's cameras (one, or one per name of the ``cameras`` parameter), and what the node
    does with all of them at once. rclpy entities are made and unmade on the executor's thread.
    """

    def __init__(self, node: Node, names: Sequence[str]) -> None:
        colours = ClassColours()  # shared: a class has one colour on every camera
        self._node = node
        self.cameras = [Camera(name, colours) for name in names] or [Camera(None, colours)]

    def __iter__(self) -> Iterator[Camera]:
        return iter(self.cameras)

    def __getitem__(self, index: int) -> Camera:
        return self.cameras[index]

    def __len__(self) -> int:
        return len(self.cameras)

    def check_topics(self) -> None:
        """Every camera's fixed output and input topics, resolved as this node resolves names:
        a name too long ends start-up with the reason (not a traceback at configure)."""
        relatives = []
        for camera in self.cameras:
            relatives += [camera.output_prefix + name for name in OUTPUT_TOPICS]
            relatives.append(camera._inputs + "image")
        check_node_topics(relatives, self._node.resolve_topic_name)

    def check_mask_topics(self, classes: list[ClassEntry]) -> None:
        """Every camera's mask topic of every class, resolved as this node resolves names."""
        check_mask_topics(
            classes,
            [camera.output_prefix for camera in self.cameras],
            self._node.resolve_topic_name,
        )

    def open_outputs(self, wanted: Mapping[str, str]) -> None:
        for camera in self.cameras:
            camera.open_outputs(self._node)
            camera.update_masks(self._node, wanted)

    def close_outputs(self) -> None:
        for camera in self.cameras:
            camera.close_outputs(self._node)

    def subscribe(
        self, transport: str, on_image: Callable[[Camera, Image | CompressedImage], None]
    ) -> None:
        for camera in self.cameras:
            camera.subscribe(self._node, transport, on_image)

    def unsubscribe(self) -> None:
        for camera in self.cameras:
            camera.unsubscribe(self._node)

    def mask_steps(self, wanted: Mapping[str, str]) -> Iterator[None]:
        """Every camera's ``Camera.mask_steps``, one publisher per step (``ExecutorWork``)."""
        for camera in self.cameras:
            yield from camera.mask_steps(self._node, wanted)

    def publish_label_info(self, stamp: Any, class_names: list[str], threshold: float) -> None:
        """The vocabulary in force on every camera's ~/label_info, with its newest frame id."""
        for camera in self.cameras:
            header = Header(stamp=stamp, frame_id=camera.frame_id)
            camera.publish_label_info(header, class_names, threshold)
