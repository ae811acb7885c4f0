"""The ovss node: images in, open-vocabulary segmentation out (contract: docs/ros_interface.md).

A thin adapter around ``ovss_ros.core.Segmenter``. The executor thread only runs cheap callbacks:
the image subscription stores the newest frame in a one-slot buffer, parameter changes are
validated and queued, ``~/enable`` flips a flag. One worker thread owns the Segmenter (it is not
thread-safe): it applies accepted changes, then segments the newest frame and publishes. So the
parameter service never waits behind inference or text encoding, and a slow model drops frames
instead of queueing them.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
)
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import SetBool
from vision_msgs.msg import LabelInfo

from ovss_ros import node_parameters
from ovss_ros.core import ModelLoadError, Segmentation, Segmenter, overlay, parse_classes
from ovss_ros.frame_buffer import FrameBuffer, FrameWorker
from ovss_ros.image_conversion import (
    ImageConversionError,
    compressed_to_rgb8,
    float32_to_image,
    image_to_rgb8,
    mono8_to_image,
    mono16_to_image,
    rgb8_to_image,
)
from ovss_ros.label_info import label_info

NODE_NAME = "ovss"
LOG_THROTTLE_S = 5.0


def sensor_qos(depth: int = 1) -> QoSProfile:
    """Sensor data QoS: best effort, newest only. A fresh object each time: QoS overrides
    modify the profile they are given, which must not leak into other subscriptions."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.VOLATILE,
    )


# Outputs: reliable so that RViz / rqt_image_view (reliable by default) and best-effort
# subscribers both match; shallow so that a slow subscriber does not hold old frames.
OUTPUT_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
# Latched: a late subscriber still learns what the label values mean.
LABEL_INFO_QOS = QoSProfile(
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


@dataclass
class FrameCounters:
    """What happened to the frames, for diagnostics."""

    received: int = 0
    processed: int = 0
    dropped_stale: int = 0  # older than max_frame_age
    dropped_overwritten: int = 0  # replaced by a newer frame before the worker took it
    rejected: int = 0  # could not be converted (bad encoding, size or data)
    failed: int = 0  # inference raised (e.g. out of GPU memory)
    last_inference_s: float = 0.0  # Segmenter.segment wall time of the last frame
    last_latency_s: float = 0.0  # header stamp to publish of the last frame


@dataclass
class Frame:
    """A received message, and when it arrived."""

    message: Image | CompressedImage
    received: Time


class OvssNode(Node):
    """Segments the newest image with the classes named in the ``classes`` parameter."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.counters = FrameCounters()
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._enabled = threading.Event()
        self._enabled.set()
        self._frame_id = ""
        self._mask_publishers: dict[str, Publisher] = {}  # class name -> ~/masks/<slug>
        self._worker: FrameWorker[Frame] | None = None
        try:
            self._values = node_parameters.declare_parameters(self)
            self._settings = node_parameters.validate(self._values)
            # Loading may take seconds (and text encoding of the first vocabulary more):
            # done before any subscription exists, so no frame waits on a half-built node.
            self.segmenter = Segmenter(self._settings.engine)
            self._check_crop(self._settings.engine.crop)
            self.segmenter.set_classes(self._settings.classes)
        except BaseException:
            self.destroy_node()
            raise
        self.get_logger().info(
            f"model {self._settings.engine.model} on {self.segmenter.device}, "
            f"{len(self.segmenter.classes)} classes"
        )

        self._labels_pub = self.create_publisher(Image, "~/labels", OUTPUT_QOS)
        self._label_info_pub = self.create_publisher(LabelInfo, "~/label_info", LABEL_INFO_QOS)
        self._overlay_pub = self.create_publisher(Image, "~/overlay", OUTPUT_QOS)
        self._confidence_pub = self.create_publisher(Image, "~/confidence", OUTPUT_QOS)
        self._camera_info_pub = self.create_publisher(CameraInfo, "~/camera_info", OUTPUT_QOS)
        self._update_mask_publishers()
        self._publish_label_info(self._stamp_now())

        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._accept_parameters)
        self.create_service(SetBool, "~/enable", self._on_enable)

        self._buffer: FrameBuffer[Frame] = FrameBuffer()
        self._worker = FrameWorker(
            self._buffer, self._process, self._apply_pending, self._on_worker_error
        )
        self._worker.start()

        if self._settings.image_transport == "compressed":
            # Like image_transport: the compressed topic hangs below the (remapped) image topic.
            topic = self.resolve_topic_name("image") + "/compressed"
            message_type: type = CompressedImage
        else:
            topic, message_type = "image", Image
        self.create_subscription(
            message_type,
            topic,
            self._on_image,
            sensor_qos(depth=1),
            qos_overriding_options=QoSOverridingOptions.with_default_policies(),
        )
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, sensor_qos(5))

    # Executor thread: cheap callbacks only.

    def _on_image(self, message: Image | CompressedImage) -> None:
        self.counters.received += 1
        if not self._enabled.is_set():
            return
        if self._buffer.put(Frame(message, self.get_clock().now())):
            self.counters.dropped_overwritten += 1

    def _on_camera_info(self, message: CameraInfo) -> None:
        # Every output has the input's width and height (labels are upsampled to the input size),
        # so the camera model applies unchanged: no scaling of K, P or the ROI needed.
        self._camera_info_pub.publish(message)

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if request.data:
            self._enabled.set()
        else:
            self._enabled.clear()
            self._buffer.clear()
        response.success = True
        response.message = "inference enabled" if request.data else "inference paused"
        self.get_logger().info(response.message)
        return response

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Refuse the whole request unless every parameter after it is valid (nothing changes)."""
        changes = self._own_changes(parameters)
        try:
            for parameter in parameters:
                if parameter.name in changes and parameter.type_ == Parameter.Type.NOT_SET:
                    raise ValueError(f"{parameter.name} cannot be unset")
            settings = node_parameters.validate_update(self._values, changes)
            self._check_crop(settings.engine.crop)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        finally:
            node_parameters.restore_types(self)
        return SetParametersResult(successful=True)

    def _accept_parameters(self, parameters: list[Parameter]) -> None:
        """Hand accepted changes to the worker; it applies them before the next frame."""
        changes = self._own_changes(parameters)
        if not changes:
            return
        with self._lock:
            self._values.update(changes)
            self._settings = node_parameters.validate(self._values)
            self._pending.update(changes)
        self._buffer.wake()

    def _own_changes(self, parameters: list[Parameter]) -> dict[str, Any]:
        # Other parameters (use_sim_time, qos_overrides.*) are rclpy's business.
        return {
            p.name: node_parameters.normalize(p.name, p.value)
            for p in parameters
            if p.name in node_parameters.SPECS
        }

    def _check_crop(self, crop: int) -> None:
        """The patch size comes with the loaded model, so EngineConfig.validate cannot check it."""
        patch = getattr(getattr(self.segmenter, "clip", None), "patch_size", None)
        if patch and crop % patch:
            raise ValueError(f"crop {crop} must be a multiple of the model's patch size {patch}")

    # Worker thread: owns the Segmenter.

    def _apply_pending(self) -> None:
        with self._lock:
            changes, self._pending = self._pending, {}
        if not changes:
            return
        engine_changes = {
            name: value
            for name, value in changes.items()
            if name in node_parameters.RUNTIME_ENGINE_FIELDS
        }
        # Validated already, so a failure here is unexpected (e.g. out of memory while encoding
        # text): log it, keep the previous state of that part, and still publish what is true.
        if engine_changes:
            try:
                self.segmenter.reconfigure(**engine_changes)
            except Exception as error:
                self.get_logger().error(f"could not apply {engine_changes}: {error}")
        if "classes" in changes:
            try:
                self.segmenter.set_classes(parse_classes(changes["classes"]))
            except Exception as error:
                self.get_logger().error(f"could not change the vocabulary: {error}")
            self.get_logger().info(
                "vocabulary: " + ", ".join(entry.name for entry in self.segmenter.classes)
            )
        if "classes" in changes or "publish_masks" in changes:
            self._update_mask_publishers()
        if "classes" in changes or "score_threshold" in changes:
            self._publish_label_info(self._stamp_now())

    def _process(self, frame: Frame) -> None:
        """Convert, segment and publish one frame; count and skip what cannot be used."""
        if not self._enabled.is_set():
            return
        message, settings = frame.message, self._settings
        header = message.header
        if settings.max_frame_age > 0.0 and self._is_stale(header, settings.max_frame_age):
            self.counters.dropped_stale += 1
            return
        try:
            if isinstance(message, CompressedImage):
                rgb = compressed_to_rgb8(message)
            else:
                rgb = image_to_rgb8(message)
        except ImageConversionError as error:
            self.counters.rejected += 1
            self.get_logger().warning(
                f"skipping frame ({self.counters.rejected} rejected so far): {error}",
                throttle_duration_sec=LOG_THROTTLE_S,
            )
            return
        start = time.perf_counter()
        try:
            segmentation = self.segmenter.segment(rgb)
        except Exception as error:  # e.g. CUDA out of memory: this frame is lost, not the node
            self.counters.failed += 1
            self.get_logger().error(
                f"inference failed ({self.counters.failed} so far): "
                f"{type(error).__name__}: {error}",
                throttle_duration_sec=LOG_THROTTLE_S,
            )
            return
        self.counters.last_inference_s = time.perf_counter() - start
        self._frame_id = header.frame_id
        self._publish(rgb, segmentation, header, settings)
        self.counters.processed += 1
        stamp = Time.from_msg(header.stamp, clock_type=self.get_clock().clock_type)
        self.counters.last_latency_s = (self.get_clock().now() - stamp).nanoseconds * 1e-9

    def _is_stale(self, header: Header, max_age: float) -> bool:
        if header.stamp.sec == 0 and header.stamp.nanosec == 0:
            return False  # no stamp: the age is unknown, not infinite
        stamp = Time.from_msg(header.stamp, clock_type=self.get_clock().clock_type)
        return (self.get_clock().now() - stamp).nanoseconds * 1e-9 > max_age

    def _publish(
        self,
        rgb: np.ndarray,
        segmentation: Segmentation,
        header: Header,
        settings: node_parameters.Settings,
    ) -> None:
        # label_info first, with the frame's header: a consumer holding a labels frame can
        # always find the vocabulary that produced it.
        self._label_info_pub.publish(
            label_info(header, segmentation.class_names, self.segmenter.config.score_threshold)
        )
        labels = segmentation.labels
        to_image = mono16_to_image if labels.dtype == np.uint16 else mono8_to_image
        self._labels_pub.publish(to_image(labels, header))
        for index, name in enumerate(segmentation.class_names):
            publisher = self._mask_publishers.get(name)
            if publisher is not None and publisher.get_subscription_count() > 0:
                mask = segmentation.mask(index).astype(np.uint8) * np.uint8(255)
                publisher.publish(mono8_to_image(mask, header))
        if settings.publish_overlay and self._overlay_pub.get_subscription_count() > 0:
            blended = overlay(rgb, segmentation, settings.overlay_alpha)
            self._overlay_pub.publish(rgb8_to_image(blended, header))
        if settings.publish_confidence and self._confidence_pub.get_subscription_count() > 0:
            self._confidence_pub.publish(float32_to_image(segmentation.confidence, header))

    def _publish_label_info(self, header: Header) -> None:
        self._label_info_pub.publish(
            label_info(
                header,
                [entry.name for entry in self.segmenter.classes],
                self.segmenter.config.score_threshold,
            )
        )

    def _stamp_now(self) -> Header:
        return Header(stamp=self.get_clock().now().to_msg(), frame_id=self._frame_id)

    def _update_mask_publishers(self) -> None:
        """One ~/masks/<slug> publisher per class while publish_masks is on; none otherwise."""
        wanted = (
            {entry.name: entry.slug for entry in self.segmenter.classes}
            if self._settings.publish_masks
            else {}
        )
        for name in list(self._mask_publishers):
            if name not in wanted:
                self.destroy_publisher(self._mask_publishers.pop(name))
        for name, slug in wanted.items():
            if name not in self._mask_publishers:
                self._mask_publishers[name] = self.create_publisher(
                    Image, f"~/masks/{slug}", OUTPUT_QOS
                )

    def _on_worker_error(self, error: BaseException) -> None:
        self.get_logger().error(
            f"worker: {type(error).__name__}: {error}", throttle_duration_sec=LOG_THROTTLE_S
        )

    def destroy_node(self) -> None:
        """Stop the worker first: it publishes with this node's handles."""
        if self._worker is not None:
            if not self._worker.stop(timeout=10.0):
                self.get_logger().warning("worker still busy with a frame at shutdown")
            self._worker = None
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Run the node until Ctrl-C; return 1 (one clear message) if it cannot start."""
    try:
        with rclpy.init(args=args):
            try:
                node = OvssNode()
            except (
                ModelLoadError,
                ValueError,
                InvalidParameterTypeException,
                InvalidParameterValueException,
            ) as error:
                rclpy.logging.get_logger(NODE_NAME).error(f"cannot start: {error}")
                return 1
            try:
                rclpy.spin(node)
            finally:
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
