"""The ovss node: images in, open-vocabulary segmentation out (contract: docs/ros_interface.md).

A thin adapter around ``ovss_ros.core.Segmenter``. The executor thread only runs cheap callbacks:
each camera's image subscription stores its newest frame in that camera's slot, parameter changes
are validated and queued, ``~/enable`` flips a flag, a timer publishes /diagnostics. One worker
thread owns the Segmenter (it is not thread-safe): it applies accepted changes, then segments the
newest frame of every camera that has one, together (``segment_many``: one forward pass for frames
of one size), and publishes each to its camera's outputs. So the parameter service never waits
behind inference or text encoding, and a slow model drops frames instead of queueing them.
rclpy entities are created and destroyed on the executor's thread only (the worker asks it for
the mask topics of a new vocabulary and waits: ``ExecutorWork``), and nothing a request holds
ends the node: every service answers, an error in any callback is counted and survived
(``request_guard``).

Every received frame gets exactly one outcome, counted per camera (``diagnostics``): processed,
dropped (paused, stale, overwritten), rejected or failed; each frame is converted, checked and
published in its own error boundary, so one bad frame never costs another its output. Every
parameter change is validated whole before it is accepted, and applied whole by the worker or
not at all: if applying fails anyway (out of memory while encoding text), the previous settings
stay in force and the parameters are put back to them.

The plain node (``OvssNode``) and the managed one (``ovss_ros.ros.lifecycle_node``) share all of
this through ``SegmentationNodeMixin``, written as the steps of a lifecycle: set up (parameters,
services, diagnostics), load (model and vocabulary), open (outputs and worker), start (inputs),
and back: stop, close. The plain node runs the first four at construction.
"""

from __future__ import annotations

import difflib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    NameValidationException,
    ParameterNotDeclaredException,
)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSPolicyKind,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from rclpy.subscription import Subscription
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import SetBool
from vision_msgs.msg import LabelInfo

from ovss_ros.core import (
    ClassColours,
    ClassEntry,
    EngineConfig,
    ModelLoadError,
    Segmentation,
    Segmenter,
    Stopped,
    overlay,
    parse_classes,
)
from ovss_ros.ros import parameters as node_parameters
from ovss_ros.ros.diagnostics import (
    OUTCOMES,
    SILENT_INPUT_S,
    CameraStats,
    InputState,
    InputWatch,
    NodeState,
    camera_report,
    duplicate_node_message,
    gpu_memory_mib,
    silent_input_message,
    status_message,
)
from ovss_ros.ros.executor_work import ExecutorWork
from ovss_ros.ros.image_conversion import (
    ImageConversionError,
    compressed_to_rgb8,
    float32_to_image,
    image_to_rgb8,
    mono8_to_image,
    mono16_to_image,
    rgb8_to_image,
)
from ovss_ros.ros.label_info import label_info
from ovss_ros.ros.request_guard import CallbackFaults, describe, guard_services, one_line
from ovss_ros.ros.signals import Interrupted, ShutdownSignals
from ovss_ros.ros.worker import FrameBuffer, FrameWorker

NODE_NAME = "ovss"
SINGLE_CAMERA = "image"  # the single camera's name in diagnostics: "ovss: image"
# A header stamp later than now by more than this (a camera whose clock runs ahead) gives the
# frame no age: never stale, no latency sample, counted as an unusable stamp. A stamp ahead by
# less (clock skew of synchronised machines, a /clock published at a few Hz in simulation)
# counts as taken now: age 0.
FUTURE_STAMP_TOLERANCE_S = 0.5
LOG_THROTTLE_S = 5.0
DIAGNOSTICS_PERIOD_S = 1.0
# What makes start-up fail with one clear message instead of a traceback.
# Changes after which the node says which method runs (it may now run without a checkpoint).
METHOD_CHANGES = {"method", "deop_checkpoint", "proposal_source", "deop_pooling"}
OUTPUT_TOPICS = ("labels", "label_info", "overlay", "confidence", "camera_info")
START_ERRORS = (
    ModelLoadError,
    ValueError,
    InvalidParameterTypeException,
    InvalidParameterValueException,
)


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
                topics[name] = node.resolve_topic_name(
                    node_parameters.mask_topic(self.output_prefix, slug)
                )
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
            f"camera {self.name}: no mask topic for class {node_parameters.quoted(name)}: "
            f"{describe(error)}"
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
        settings: node_parameters.Settings,
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
    age_known: bool = True  # False: its stamp gives no age (``_stamp_problem``)


QOS_PREFIX = "qos_overrides."


def undeclared_overrides(given: list[str], declared: list[str]) -> list[tuple[str, str | None]]:
    """Each name in ``given`` that is not in ``declared``, with the closest declared name
    (``difflib.get_close_matches``, cutoff 0.6), or None when nothing is close."""
    known = set(declared)
    return [
        (name, next(iter(difflib.get_close_matches(name, declared, n=1, cutoff=0.6)), None))
        for name in given
        if name not in known
    ]


def undeclared_message(name: str, closest: str | None) -> str:
    hint = f"did you mean {closest}?" if closest else "no parameter of that name exists"
    return f"{one_line(name, 120)} is not a parameter of this node: {hint}"


class UndeclaredParameters(ParameterNotDeclaredException):
    """A request names parameters the node does not declare. rclpy's own refusal says
    "Invalid access to undeclared parameter(s): []" (its list comes out empty); this one names
    each parameter and the closest declared one (``undeclared_overrides``)."""

    def __init__(self, found: list[tuple[str, str | None]]) -> None:
        super().__init__([name for name, _ in found])
        self.args = ("; ".join(undeclared_message(name, closest) for name, closest in found),)


def stamp_usable(stamp: Any) -> bool:
    """Whether a builtin_interfaces/Time is a time: sec >= 0 (rclpy refuses negative times) and
    nanosec below one second. A frame whose stamp is not gets "age unknown": it is never stale
    and gives no latency sample, and it is segmented and published with its header as sent."""
    return stamp.sec >= 0 and stamp.nanosec < 1_000_000_000


def to_rgb8(message: Image | CompressedImage, max_pixels: int) -> np.ndarray:
    """The frame as HxWx3 uint8 RGB; raises ImageConversionError, and its ImageTooLarge for a
    frame of more than ``max_pixels`` pixels, refused from its declared size (width x height,
    or the compressed data's header) before anything is decoded or converted."""
    if isinstance(message, CompressedImage):
        return compressed_to_rgb8(message, max_pixels=max_pixels)
    return image_to_rgb8(message, max_pixels=max_pixels)


# One frame ready to publish: (frame, its RGB pixels, its segmentation, inference seconds).
Result = tuple[Frame, np.ndarray, Segmentation, float]


class SegmentationNodeMixin:
    """What the plain and the managed ovss node share; mixed into an rclpy Node subclass.

    The steps, in lifecycle order: ``_setup`` (construction), ``_load`` and ``_open``
    (configure), ``_start`` (activate), ``_stop`` (deactivate), ``_close`` and ``_unload``
    (cleanup). Each undoing step tolerates a half-done doing step, so a failed configure or
    construction can always be undone.
    """

    # For readers and type checkers: this class is only ever mixed into a Node.
    get_logger: Callable[..., Any]
    get_clock: Callable[[], Clock]
    get_name: Callable[[], str]

    def _setup(self, inactive_reason: str = "not active") -> None:
        """Declare and check the parameters, build the cameras, start ~/enable and diagnostics.

        Raises ValueError (ParameterError) or rclpy's parameter exceptions if a parameter
        given at start-up is invalid.
        """
        self.segmenter: Segmenter | None = None
        self._device = ""  # of the loaded model; kept after unloading, for GPU memory
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._enabled = threading.Event()  # ~/enable
        self._enabled.set()
        self._active = threading.Event()  # inputs subscribed (lifecycle: active)
        self._inactive_reason = inactive_reason
        self._buffer: FrameBuffer[Frame] = FrameBuffer()
        self._worker: FrameWorker[Frame] | None = None
        self.cameras: list[Camera] = []
        # Frame accounting: frames received and without an outcome; each camera's newest.
        self._frames_lock = threading.Lock()
        self._held: set[Frame] = set()
        self._newest: dict[str, Frame] = {}
        # What is in force (the worker's): parameter values, settings, last change's fate.
        self._applied: dict[str, Any] = {}
        self._applied_settings: node_parameters.Settings | None = None
        self._parameter_change = ("none", False)  # (diagnostics text, failed)
        self._reverts: dict[str, tuple[Any, Any]] = {}  # name -> (refused value, in force)
        self._reverting = False
        self._warned: dict[tuple, float] = {}  # kind of warning -> when last logged (worker)
        # Exceptions in callbacks (a malformed request, ...): counted, each kind logged once.
        self.callback_faults = CallbackFaults(self.get_logger().warning)
        self._executor_work: ExecutorWork | None = None  # made below, with the other entities

        self._overrides_reported: set[str] = set()
        self._duplicates_logged = 0
        self._values = node_parameters.declare_parameters(self)
        self._report_undeclared_overrides(qos=False)
        self._settings = node_parameters.validate(self._values)
        colours = ClassColours()  # shared: a class has one colour on every camera
        self.cameras = [Camera(name, colours) for name in self._settings.cameras] or [
            Camera(None, colours)
        ]
        self._check_node_topics()
        self._check_mask_topics(self._settings.classes)

        self.add_pre_set_parameters_callback(node_parameters.coerce)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._accept_parameters)
        # The worker asks the executor thread to put parameters back (_revert_parameters).
        self._revert_guard = self.create_guard_condition(self._revert_parameters)
        # The worker asks the executor thread to make and unmake mask topics (ExecutorWork).
        self._executor_work = ExecutorWork(self, on_error=self._on_executor_work_error)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Steady time: diagnostics go on while a paused bag holds the simulated clock.
        self.create_timer(
            DIAGNOSTICS_PERIOD_S,
            self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )
        # Every service answers, whatever a request holds (request_guard).
        guard_services(self, self.callback_faults)

    def _load(self) -> None:
        """Load the model and encode the vocabulary (seconds); raises START_ERRORS."""
        with self._lock:
            self._pending.clear()  # changes accepted so far are in the settings already
            settings, values = self._settings, dict(self._values)
        self.segmenter = Segmenter(settings.engine, stop=stop_event(self))
        self._device = str(self.segmenter.device)
        self._check_model_fit(settings.engine)
        self.segmenter.set_classes(settings.classes)
        self._applied, self._applied_settings = values, settings
        self._parameter_change = ("none", False)
        cameras = f", cameras {', '.join(settings.cameras)}" if settings.cameras else ""
        self.get_logger().info(
            f"model {settings.engine.model} on {self.segmenter.device}, "
            f"{len(self.segmenter.classes)} classes{cameras}"
        )
        self._log_method()

    def _log_method(self) -> None:
        """Say which method runs (a DeOP without checkpoint, training-free, as a warning)."""
        notice, warn = self.segmenter.method_notice()
        # Two call sites: rclpy refuses one call site logging at two severities.
        if warn:
            self.get_logger().warning(f"method {notice}")
        else:
            self.get_logger().info(f"method {notice}")

    def _open(self) -> None:
        """Create the outputs and start the worker: all done before any input is subscribed,
        so no frame waits on a half-built node."""
        wanted = self._wanted_masks()
        for camera in self.cameras:
            camera.open_outputs(self)
            camera.update_masks(self, wanted)
        self._publish_label_info()
        self._buffer = FrameBuffer()
        # The engine's stop event (stop_event) is the worker's too: set, it ends both.
        self._worker = FrameWorker(
            self._buffer,
            self._process,
            self._apply_pending,
            self._on_worker_error,
            stop=stop_event(self),
        )
        self._worker.start()

    def _start(self) -> None:
        self._active.set()
        for camera in self.cameras:
            camera.subscribe(self, self._settings.image_transport, self._on_image)
        # Every qos_overrides.* the node knows is declared now: outputs and inputs exist.
        self._report_undeclared_overrides(qos=True)

    def _stop(self) -> None:
        self._active.clear()
        for camera in self.cameras:
            camera.unsubscribe(self)
        self._clear_frames()

    def _close(self) -> None:
        """Stop the worker, then destroy the outputs it publishes with.

        The stop event ends the engine's current step (text encoding, an inference stage) with
        Stopped, and the worker ends without publishing more; only then do the publishers go, so
        nothing is published on a destroyed publisher or a context that is shut down. Should
        the worker still be busy after WORKER_STOP_TIMEOUT_S, its errors are not reported (it is
        stopping) and the process entry does not wait for it (``node_entry.run_main``). The next
        configure gets a fresh stop event.
        """
        stop_event(self).set()
        worker, self._worker = self._worker, None
        if worker is not None and not worker.stop(timeout=WORKER_STOP_TIMEOUT_S):
            doing = WORKER_STEPS.get(worker.step or "", "working")
            self.get_logger().warning(
                f"worker still {doing} {WORKER_STOP_TIMEOUT_S:.0f} s after the stop request: "
                "not waiting for it"
            )
        if self._executor_work is not None:  # mask topics the worker asked for: not needed now
            self._executor_work.cancel()
        for camera in self.cameras:
            camera.close_outputs(self)
        self._stopping = threading.Event()  # for the next configure

    def _unload(self) -> None:
        """Drop the model: its memory is freed once the last reference goes."""
        self.segmenter = None

    def _running(self) -> bool:
        return self._active.is_set() and self._enabled.is_set()

    # Executor thread: cheap callbacks only.

    def _on_image(self, camera: Camera, message: Image | CompressedImage) -> None:
        if not self._enabled.is_set():
            camera.stats.receive("dropped_paused")
            return
        frame, previous = self._admit(camera, message)
        if self._buffer.put(frame, slot=camera.name):
            if previous is not None:  # put replaced the frame this camera put last
                self._settle(previous, "dropped_overwritten")
        elif self._buffer.closed:  # shutting down: no worker will take it
            self._settle(frame, "dropped_paused")

    def _admit(
        self, camera: Camera, message: Image | CompressedImage
    ) -> tuple[Frame, Frame | None]:
        """Count a frame received and hold it until it has an outcome; return it and the frame
        this camera admitted before it."""
        frame = Frame(camera, message, self.get_clock().now())
        camera.stats.receive()
        with self._frames_lock:
            self._held.add(frame)
            previous, self._newest[camera.name] = self._newest.get(camera.name), frame
        return frame, previous

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if request.data:
            self._enabled.set()
        else:
            self._enabled.clear()
            self._clear_frames()
        response.success = True
        response.message = "inference enabled" if request.data else "inference paused"
        self.get_logger().info(response.message)
        return response

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Refuse the whole request unless every parameter after it is valid (nothing changes).

        Valid means everything the worker will do with it can be done: the whole configuration
        passes ``node_parameters.validate`` (types, ranges, vocabulary, templates, query count),
        the crop fits the loaded model, and every class gets a mask topic that ROS accepts.
        """
        changes = self._own_changes(parameters)
        if not changes:  # rclpy's own (use_sim_time, qos_overrides.*): its business
            return SetParametersResult(successful=True)
        try:
            for parameter in parameters:
                if parameter.name in changes and parameter.type_ == Parameter.Type.NOT_SET:
                    raise ValueError(f"{parameter.name} cannot be unset")
            settings = node_parameters.validate_update(self._values, changes)
            self._check_model_fit(settings.engine, settings.classes)
            if "classes" in changes:
                self._check_mask_topics(settings.classes)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        except Exception as error:  # a request nobody foresaw: refused, never accepted
            self.callback_faults.record("parameter validation", error)
            return SetParametersResult(
                successful=False, reason=f"cannot validate the request: {describe(error)}"
            )
        finally:
            node_parameters.restore_types(self)
        return SetParametersResult(successful=True)

    def _accept_parameters(self, parameters: list[Parameter]) -> None:
        """Hand accepted changes to the worker; it applies them before the next frame.

        Not a revert (``_revert_parameters``): those values are in force already.
        """
        changes = self._own_changes(parameters)
        if not changes:
            return
        with self._lock:
            self._values.update(changes)
            self._settings = node_parameters.validate(self._values)
            if not self._reverting:
                self._pending.update(changes)
        if not self._reverting:
            self._buffer.wake()

    def _revert_parameters(self) -> None:
        """Put parameters whose change failed in the worker back to the values in force, so that
        ``ros2 param get`` tells the truth; a name changed again meanwhile is left alone (that
        newer change is queued). Runs on the executor thread, like every parameter request."""
        with self._lock:
            reverts, self._reverts = self._reverts, {}
            wanted = [
                Parameter(name, node_parameters.SPECS[name].type, value)
                for name, (refused, value) in reverts.items()
                if name not in self._pending and self._values.get(name) == refused
            ]
        if not wanted:
            return
        self._reverting = True
        try:
            result = self.set_parameters_atomically(wanted)
        finally:
            self._reverting = False
        names = ", ".join(parameter.name for parameter in wanted)
        if result.successful:
            self.get_logger().warning(f"parameters put back to the values in force: {names}")
        else:
            self.get_logger().error(f"could not put back {names}: {result.reason}")

    def _own_changes(self, parameters: list[Parameter]) -> dict[str, Any]:
        return {
            p.name: node_parameters.normalize(p.name, p.value)
            for p in parameters
            if p.name in node_parameters.SPECS
        }

    def _check_model_fit(
        self, engine: EngineConfig, classes: list[ClassEntry] | None = None
    ) -> None:
        """What EngineConfig.validate cannot check: settings that depend on the loaded model's
        patch size, and a vocabulary against what the loaded method can take (PnP-OVSS: the
        prompt with every class within the VLM's text positions), nor can anyone before the
        model is loaded: then the next configure does. Raises ValueError."""
        if self.segmenter is not None:
            self.segmenter.check_config(engine, classes)

    def _check_node_topics(self) -> None:
        """Every camera's fixed output and input topics, resolved as this node resolves names:
        a name too long ends start-up with the reason (not a traceback at configure)."""
        relatives = []
        for camera in self.cameras:
            relatives += [camera.output_prefix + name for name in OUTPUT_TOPICS]
            relatives.append(camera._inputs + "image")
        node_parameters.check_node_topics(relatives, self.resolve_topic_name)

    def _check_mask_topics(self, classes: list[ClassEntry]) -> None:
        """Every camera's mask topic of every class, resolved as this node resolves names."""
        node_parameters.check_mask_topics(
            classes, [camera.output_prefix for camera in self.cameras], self.resolve_topic_name
        )

    def _clear_frames(self) -> None:
        """Pausing or stopping: the frames waiting are dropped, and counted as such (a frame
        already being published is not: it is counted when it is out)."""
        self._buffer.clear()
        with self._frames_lock:
            dropped = [frame for frame in self._held if frame.state == "waiting"]
            for frame in dropped:
                frame.state = "dropped_paused"
                self._held.discard(frame)
        for frame in dropped:
            frame.camera.stats.settle("dropped_paused")

    def _settle(
        self,
        frame: Frame,
        outcome: str,
        inference_s: float | None = None,
        latency_s: float | None = None,
    ) -> bool:
        """Give ``frame`` its one outcome; False (nothing counted) if it has one already."""
        with self._frames_lock:
            if frame.state in OUTCOMES:
                return False
            frame.state = outcome
            self._held.discard(frame)
        frame.camera.stats.settle(outcome, inference_s, latency_s)
        return True

    def _claim(self, frame: Frame) -> bool:
        """Mark a segmented frame as being published; False if it was dropped meanwhile."""
        with self._frames_lock:
            if frame.state != "waiting":
                return False
            frame.state = "publishing"
            return True

    def _publish_diagnostics(self) -> None:
        segmenter = self.segmenter
        change, change_failed = self._parameter_change
        state = NodeState(
            device=self._device or self._values["device"],
            vocabulary_size=len(segmenter.classes) if segmenter is not None else 0,
            enabled=self._running(),
            gpu_memory_mib=gpu_memory_mib(self._device) if self._device else None,
            not_enabled_reason=(
                "inference paused (~/enable)" if self._active.is_set() else self._inactive_reason
            ),
            parameter_change=change,
            parameter_change_failed=change_failed,
            duplicate_nodes=self._check_duplicate_name(),
            node_name=self.get_fully_qualified_name(),
            callback_errors=self.callback_faults.total,
            recent_callback_errors=self.callback_faults.recent(),
        )
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        for camera in self.cameras:
            input_state = camera.input_state()
            self._log_silent_input(camera, input_state)
            report = camera_report(camera.stats.window(), state, input_state)
            array.status.append(
                status_message(f"{self.get_name()}: {camera.name}", state.device, report)
            )
        self._diagnostics_pub.publish(array)

    def _log_silent_input(self, camera: Camera, input_state: InputState | None) -> None:
        """Log the diagnostics' silent-input WARN once per silence (it names the fix)."""
        silent = input_state is not None and (input_state.silent_s or 0.0) >= SILENT_INPUT_S
        if silent and not camera.silence_logged:
            self.get_logger().warning(f"camera {camera.name}: {silent_input_message(input_state)}")
        camera.silence_logged = silent

    def _check_duplicate_name(self) -> int:
        """How many other nodes in the graph have this node's fully qualified name; logged when
        the number grows (discovery: a late joiner sees the whole graph within seconds)."""
        own = self.get_fully_qualified_name()
        try:
            others = self.get_fully_qualified_node_names().count(own) - 1
        except Exception as error:  # a graph query: never worth the diagnostics
            self.get_logger().debug(f"graph query failed: {describe(error)}")
            return self._duplicates_logged
        if others > self._duplicates_logged:
            self.get_logger().warning(duplicate_node_message(own, others))
        self._duplicates_logged = max(others, 0)
        return self._duplicates_logged

    def _report_undeclared_overrides(self, qos: bool) -> None:
        """Warn about every parameter given at start-up (-p, --params-file) that this node does
        not declare, naming the closest declared one: rclpy ignores such a value without a word.

        ``qos``: include ``qos_overrides.*`` names, which rclpy declares only as the publishers
        and subscriptions they configure are created (so: once the inputs are subscribed).
        Each name is reported once.
        """
        declared = list(self._parameters)  # rclpy's own too (use_sim_time, ...)
        # rclpy keeps the start-up values here and offers no public accessor.
        given = list(getattr(self, "_parameter_overrides", {}))
        for name, closest in undeclared_overrides(given, declared):
            if name in self._overrides_reported or (name.startswith(QOS_PREFIX) and not qos):
                continue
            self._overrides_reported.add(name)
            self.get_logger().warning(
                f"parameter {undeclared_message(name, closest)} (the value is ignored)"
            )

    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        """rclpy's, after refusing a list with an undeclared name whole (``UndeclaredParameters``,
        which the parameter services turn into an unsuccessful result with its message)."""
        self._refuse_undeclared(parameter_list)
        return super().set_parameters(parameter_list)

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        """rclpy's, after refusing a list with an undeclared name (``UndeclaredParameters``)."""
        self._refuse_undeclared(parameter_list)
        return super().set_parameters_atomically(parameter_list)

    def _refuse_undeclared(self, parameter_list: list[Parameter]) -> None:
        names = [getattr(parameter, "name", None) for parameter in parameter_list]
        if None in names:  # not Parameters: rclpy's own TypeError says so
            return
        found = undeclared_overrides(names, list(self._parameters))
        if found:
            raise UndeclaredParameters(found)

    # Worker thread: owns the Segmenter.

    def _apply_pending(self) -> None:
        """Apply the accepted changes, all of them or none.

        Validation refused everything that can be foreseen, so a failure here is unexpected
        (e.g. out of memory while encoding text). Then the engine keeps its previous settings
        and vocabulary (``Segmenter.update`` changes nothing when it raises), the node keeps
        its previous output settings, label_info keeps telling the vocabulary in force,
        diagnostics show the failure, and the parameters are put back to the values in force
        (``_revert_parameters``).
        """
        with self._lock:
            changes, self._pending = self._pending, {}
        if not changes or self.segmenter is None:
            return
        engine_changes = {
            name: value
            for name, value in changes.items()
            if name in node_parameters.RUNTIME_ENGINE_FIELDS
        }
        failure = None
        try:
            # One step: validated and built for the end state, never for a mix of old and new
            # (new classes with new background words, a method with the classes it gets).
            classes = parse_classes(changes["classes"]) if "classes" in changes else None
            self.segmenter.update(classes, **engine_changes)
        except Stopped:  # the node is stopping: nothing failed, nothing to put back
            raise
        except Exception as error:
            # Only the text: the traceback holds the tensors of the failed encoding.
            failure = describe(error)
        self._settle_change(changes, failure)
        if failure is None and METHOD_CHANGES & set(changes):
            self._log_method()
        if "classes" in changes and failure is None:
            names = ", ".join(node_parameters.quoted(e.name) for e in self.segmenter.classes)
            self.get_logger().info(f"vocabulary: {names}")
        if self._update_masks():
            self._publish_label_info()

    def _update_masks(self) -> bool:
        """Have the executor's thread make the mask topics match the vocabulary in force, and
        wait until it has: the next frame is published with them. False if the node stopped
        first (nothing more is published then)."""
        wanted = self._wanted_masks()

        def steps() -> Iterator[None]:
            for camera in self.cameras:
                yield from camera.mask_steps(self, wanted)

        return self._executor_work.run(steps(), stop_event(self))

    def _on_executor_work_error(self, error: BaseException) -> None:
        self.get_logger().error(f"mask topics: {describe(error)}")

    def _settle_change(self, changes: Mapping[str, Any], failure: str | None) -> None:
        """Record what is in force after applying ``changes`` (failed: ``failure``)."""
        if failure is None:
            self._applied.update(changes)
        else:
            # The truth, whatever the engine kept: its settings, and the vocabulary in force.
            for name in changes:
                if name in node_parameters.RUNTIME_ENGINE_FIELDS:
                    value = getattr(self.segmenter.config, name)
                    self._applied[name] = node_parameters.in_force(name, value)
        try:
            self._applied_settings = node_parameters.validate(self._applied)
        except ValueError as error:  # only if restoring the engine failed half-way
            self.get_logger().error(f"settings in force do not validate: {error}")
        if failure is None:
            self._parameter_change = ("applied", False)
            return
        names = ", ".join(sorted(changes))
        self._parameter_change = (f"{names}: {failure}; previous settings in force", True)
        self.get_logger().error(
            f"could not apply the change of {names} ({failure}): the previous settings stay in "
            "force and the parameters are put back"
        )
        with self._lock:
            for name, value in changes.items():
                if value != self._applied[name]:
                    self._reverts[name] = (value, self._applied[name])
        self._revert_guard.trigger()

    def _process(self, frames: list[Frame]) -> None:
        """Convert, segment together and publish the newest frame of each camera that has one.

        Every frame gets exactly one outcome: what cannot be used is counted and skipped on its
        own, and an error nobody expected costs only the frames it left without an outcome
        (counted as failed), never another frame's output.
        """
        try:
            self._process_frames(frames)
        except Stopped:  # the node is stopping: what was not published is dropped, quietly
            for frame in frames:
                self._settle(frame, "dropped_paused")
            raise
        finally:
            for frame in frames:
                if self._settle(frame, "failed"):
                    self.get_logger().error(
                        f"a frame from {frame.camera.name} was lost to an unexpected error",
                        throttle_duration_sec=LOG_THROTTLE_S,
                    )

    def _process_frames(self, frames: list[Frame]) -> None:
        settings = self._applied_settings
        if not self._running() or settings is None:
            for frame in frames:
                self._settle(frame, "dropped_paused")
            return
        batch = []
        for frame in frames:
            try:
                rgb = self._convert(frame, settings)
            except Exception as error:
                self._fail(frame, "while converting", error)
                continue
            if rgb is not None:
                batch.append((frame, rgb))
        for frame, rgb, segmentation, inference_s in self._segment(batch):
            if not self._running() or not self._claim(frame):
                self._settle(frame, "dropped_paused")  # paused or deactivated meanwhile
                continue
            try:
                header = frame.message.header
                frame.camera.frame_id = header.frame_id
                frame.camera.publish(
                    rgb, segmentation, header, settings, self.segmenter.config.score_threshold
                )
            except Exception as error:
                self._fail(frame, "while publishing", error)
            else:
                age = self._age(header) if frame.age_known else None
                self._settle(frame, "processed", inference_s, age)

    def _fail(self, frame: Frame, stage: str, error: Exception) -> None:
        if self._settle(frame, "failed"):
            self.get_logger().error(
                f"a frame from {frame.camera.name} failed {stage} "
                f"({frame.camera.stats.totals.failed} failed so far): "
                f"{describe(error)}",
                throttle_duration_sec=LOG_THROTTLE_S,
            )

    def _convert(self, frame: Frame, settings: node_parameters.Settings) -> np.ndarray | None:
        """The frame as RGB, or None (its outcome given) if it is stale or cannot be read."""
        message, stats = frame.message, frame.camera.stats
        problem = self._stamp_problem(message.header.stamp)
        if problem is not None:
            frame.age_known = False
            stats.count("unusable_stamp")
            self._warn_once_in_a_while(
                ("stamp", frame.camera.name),
                f"frame from {frame.camera.name} has a header stamp that {problem}: its age is "
                "unknown, so it is never too old and gives no latency",
            )
        if settings.max_frame_age > 0.0 and frame.age_known:
            age = self._age(message.header)
            if age is not None and age > settings.max_frame_age:
                self._settle(frame, "dropped_stale")
                return None
        try:
            return to_rgb8(message, settings.max_input_pixels)
        except ImageConversionError as error:
            self._settle(frame, "rejected")
            self._warn_once_in_a_while(
                ("rejected", frame.camera.name, type(error).__name__),
                f"skipping frame from {frame.camera.name} ({stats.totals.rejected} rejected so "
                f"far): {one_line(str(error))}",
            )
            return None

    def _warn_once_in_a_while(self, kind: tuple, text: str) -> None:
        """Log a warning unless one of the same kind was logged within LOG_THROTTLE_S: a stream
        of bad frames gives a line every few seconds, and a new kind of problem shows at once
        (rclpy throttles per call site, which would hide it behind the first kind)."""
        now = time.monotonic()
        if now - self._warned.get(kind, float("-inf")) >= LOG_THROTTLE_S:
            self._warned[kind] = now
            self.get_logger().warning(text)

    def _segment(self, batch: list[tuple[Frame, np.ndarray]]) -> list[Result]:
        """Segment the frames in one ``segment_many`` call.

        If it raises (e.g. CUDA out of memory), each frame is tried alone, so that a batch too
        large for the GPU, or one camera's frame that the model cannot take, costs only the
        frames that fail on their own: those are counted as failed, and the node goes on.
        """
        if not batch:
            return []
        start = time.perf_counter()
        try:
            segmentations = self.segmenter.segment_many([rgb for _, rgb in batch])
        except Stopped:
            raise
        except Exception as error:
            # Only the text leaves this block: the traceback holds the failed forward's tensors.
            failure = describe(error)
        else:
            inference_s = time.perf_counter() - start
            self._count_batched(batch)
            return [
                (frame, rgb, segmentation, inference_s)
                for (frame, rgb), segmentation in zip(batch, segmentations, strict=True)
            ]
        if len(batch) == 1:
            frame = batch[0][0]
            self._settle(frame, "failed")
            self.get_logger().error(
                f"inference failed on a frame from {frame.camera.name} "
                f"({frame.camera.stats.totals.failed} so far): {failure}",
                throttle_duration_sec=LOG_THROTTLE_S,
            )
            return []
        self.get_logger().warning(
            f"inference failed on a batch of {len(batch)} frames ({failure}): "
            "segmenting them one by one",
            throttle_duration_sec=LOG_THROTTLE_S,
        )
        return [result for item in batch for result in self._segment([item])]

    def _count_batched(self, batch: list[tuple[Frame, np.ndarray]]) -> None:
        """Count the frames that shared a forward pass: the engine batches equal resized sizes."""
        try:
            groups = self.segmenter.batch_groups([rgb for _, rgb in batch])
        except Stopped:
            raise
        except Exception as error:  # a statistic: never worth a frame's output
            self._on_worker_error(error)
            return
        for group in groups:
            if len(group) > 1:
                for index in group:
                    batch[index][0].camera.stats.count("batched")

    def _stamp_problem(self, stamp: Any) -> str | None:
        """Why a header stamp gives no age, or None when it does (or the frame is unstamped):
        it is no time (``stamp_usable``), or it is more than FUTURE_STAMP_TOLERANCE_S later
        than now (the camera's clock runs ahead of this node's)."""
        if not stamp_usable(stamp):
            return f"is no time (sec {stamp.sec}, nanosec {stamp.nanosec})"
        age = self._age_of(stamp)
        if age is not None and age < -FUTURE_STAMP_TOLERANCE_S:
            return (
                f"is {-age:.3f} s later than now (the camera's clock runs ahead of this "
                f"node's by more than the {FUTURE_STAMP_TOLERANCE_S} s tolerated)"
            )
        return None

    def _age(self, header: Header) -> float | None:
        """Seconds from the header stamp to now, at least 0; None when the age is unknown: an
        unstamped frame (zero stamp), a stamp that is no time (``stamp_usable``) or one more
        than FUTURE_STAMP_TOLERANCE_S in the future (a stamp ahead by less counts as now)."""
        age = self._age_of(header.stamp)
        if age is None or age < -FUTURE_STAMP_TOLERANCE_S:
            return None
        return max(age, 0.0)

    def _age_of(self, stamp: Any) -> float | None:
        """Seconds from ``stamp`` to now, negative for a stamp in the future; None for an
        unstamped frame or a stamp that is no time."""
        if (stamp.sec == 0 and stamp.nanosec == 0) or not stamp_usable(stamp):
            return None
        clock = self.get_clock()
        try:
            time_of_stamp = Time.from_msg(stamp, clock_type=clock.clock_type)
        except (ValueError, OverflowError, TypeError):
            return None
        return (clock.now() - time_of_stamp).nanoseconds * 1e-9

    def _publish_label_info(self) -> None:
        if self.segmenter is None:
            return
        names = [entry.name for entry in self.segmenter.classes]
        threshold = self.segmenter.config.score_threshold
        stamp = self.get_clock().now().to_msg()
        for camera in self.cameras:
            header = Header(stamp=stamp, frame_id=camera.frame_id)
            camera.publish_label_info(header, names, threshold)

    def _wanted_masks(self) -> dict[str, str]:
        """Class name -> slug of the mask topics there should be (none with publish_masks off)."""
        settings = self._applied_settings
        if settings is None or not settings.publish_masks or self.segmenter is None:
            return {}
        return {entry.name: entry.slug for entry in self.segmenter.classes}

    def _on_worker_error(self, error: BaseException) -> None:
        self.get_logger().error(f"worker: {describe(error)}", throttle_duration_sec=LOG_THROTTLE_S)


class OvssNode(SegmentationNodeMixin, Node):
    """Segments the newest image of each camera with the classes of the ``classes`` parameter.

    Starts serving at construction: loads the model, opens the outputs, subscribes the inputs.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        try:
            self._setup(inactive_reason="starting")
            self._load()
            self._open()
            self._start()
        except BaseException:
            self.destroy_node()
            raise

    def destroy_node(self) -> None:
        if hasattr(self, "cameras"):  # _setup got that far
            self._stop()
            self._close()
        super().destroy_node()


def run(
    make_node: Callable[[], Node],
    args: list[str] | None = None,
    signals: ShutdownSignals | None = None,
) -> int:
    """Run a node until SIGINT or SIGTERM; return the process's exit status.

    0 after a signal while serving (or a context shut down from elsewhere); 1 with one clear
    message if the node cannot start; 128 + the signal number if a signal ended start-up.
    ``signals``: the handlers ``node_entry`` installed before the heavy imports; installed here
    if not given. rclpy's own handlers stay out (they would shut the context down while the
    worker still publishes): after a signal, the node is destroyed first (worker stopped, then
    its publishers), then the context is shut down.
    """
    signals = signals or ShutdownSignals.install()
    init = None
    try:
        init = rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        with init:
            try:
                node = make_node()
            except START_ERRORS as error:
                rclpy.logging.get_logger(NODE_NAME).error(f"cannot start: {error}")
                return 1
            except NameValidationException as error:  # a topic or service name too long, ...
                reason = " ".join(str(error).split())
                rclpy.logging.get_logger(NODE_NAME).error(
                    f"cannot start: {reason} (every topic and service of this node is "
                    "<namespace>/<node name>/[<camera>/]<name>: shorten the namespace, the node "
                    "name or the camera names)"
                )
                return 1
            try:
                # From here a signal asks for an orderly stop; the stop event ends the engine's
                # current step at once, even one the spin loop is waiting for (lifecycle
                # configure encoding a vocabulary).
                signals.serve(on_request=lambda: stop_event(node).set())
                spin_until_stopped(node, lambda: signals.requested)
                if signals.requested:
                    node.get_logger().info(f"{signals.name()}: shutting down")
            finally:
                node.destroy_node()
    except Interrupted as interrupt:
        return interrupt.exit_status
    finally:
        if init is not None:  # shut down already: free it (the DDS participant) now, not at exit
            init.context.destroy()
    return 0


def main(args: list[str] | None = None, signals: ShutdownSignals | None = None) -> int:
    return run(OvssNode, args, signals)


# Step of a FrameWorker -> what the worker is doing then, for the log.
WORKER_STEPS = {"between_frames": "applying a change", "handle_frames": "segmenting frames"}
WORKER_STOP_TIMEOUT_S = 5.0
# How soon at most the spin loop notices a signal: Python runs its handlers between bytecodes,
# not while the executor waits. (Each wake-up costs CPU: 0.1 s cost 0.7 % of a core idle.)
SPIN_POLL_S = 0.5
SPIN_ERROR_PAUSE_S = 0.01


def stop_event(node: SegmentationNodeMixin) -> threading.Event:
    """The event that stops ``node``'s engine and worker: text encoding and every inference
    stage raise Stopped once it is set (``Segmenter(config, stop)``), and the worker ends.

    Set by a shutdown signal and by ``_close`` (cleanup, shutdown); ``_close`` then puts a
    fresh one in place for the next configure.
    """
    event = vars(node).get("_stopping")
    if event is None:
        event = node._stopping = threading.Event()
    return event


def spin_until_stopped(node: Node, stop_requested: Callable[[], bool]) -> None:
    """Spin ``node`` until ``stop_requested()`` or its context is shut down.

    An exception out of ``spin_once`` (a callback raised) ends nothing: it is counted in
    ``node.callback_faults`` (logged once per kind) and spinning goes on.
    """
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    faults = getattr(node, "callback_faults", None)
    try:
        while not stop_requested() and node.context.ok():
            try:
                executor.spin_once(timeout_sec=SPIN_POLL_S)
            except ExternalShutdownException:
                raise
            except Exception as error:
                # A callback raised (or the executor did): nothing that arrives over DDS may end
                # the node. Counted and logged once per kind; a short pause bounds the cost of
                # an error that repeats on every turn.
                if faults is not None:
                    faults.record("callback", error)
                else:
                    node.get_logger().error(f"callback: {describe(error)}")
                time.sleep(SPIN_ERROR_PAUSE_S)
    except ExternalShutdownException:
        pass
    finally:
        executor.remove_node(node)
        executor.shutdown()


if __name__ == "__main__":
    # The console script (node_entry.ovss_node) installs its handlers before these imports.
    from ovss_ros.ros.entry import run_main

    sys.exit(run_main(main))
