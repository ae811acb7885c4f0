"""The ovss node: images in, open-vocabulary segmentation out (contract: docs/ros_interface.md).

A thin adapter around ``ovss_ros.core.Segmenter``. The executor thread only runs cheap callbacks:
each camera's image subscription stores its newest frame in that camera's slot, parameter changes
are validated and queued, ``~/enable`` flips a flag, a timer publishes /diagnostics. One worker
thread segments the newest frame of every camera that has one, together (``segment_many``: one
forward pass for frames of one size), and publishes each to its camera's outputs. Beside it the
change encoder's thread (``change_encoder``) prepares accepted changes (text encoding, model
loads) while the worker goes on with the state in force; the worker puts each prepared change in
force between two frames. So the parameter service never waits behind inference or text
encoding, frames never wait for a change, and a slow model drops frames instead of queueing
them.
rclpy entities are created and destroyed on the executor's thread only (the worker asks it for
the mask topics of a new vocabulary and waits: ``ExecutorWork``), and nothing a request holds
ends the node: every service answers, an error in any callback is counted and survived
(``request_guard``).

Every received frame gets exactly one outcome, counted per camera (``diagnostics``): processed,
dropped (paused, stale, overwritten), rejected or failed; each frame is converted, checked and
published in its own error boundary, so one bad frame never costs another its output. Every
parameter change is validated whole before it is accepted, and applied whole (prepared beside
the worker, committed by it) or not at all: if preparing fails anyway (out of memory while
encoding text), the previous settings stay in force and the parameters are put back to them.

The plain node (``OvssNode``) and the managed one (``ovss_ros.ros.lifecycle_node``) share all of
this through ``SegmentationNodeMixin``, written as the steps of a lifecycle: set up (parameters,
services, diagnostics), load (model and vocabulary), open (outputs and worker), start (inputs),
and back: stop, close. The plain node runs the first four at construction.

This module is the wiring only; each concern is its own module: ``parameters`` (declare,
validate), ``transactions`` (accepted changes -> change encoder -> worker, revert on failure),
``change_encoder`` (the thread that prepares them), ``cameras`` (subscriptions, publishers, QoS,
mask topics), ``frames`` (frame accounting), ``worker`` (the newest-frame buffer and the worker
thread), ``processing`` (what the worker does with frames), ``node_diagnostics``
(/diagnostics), ``undeclared`` (unknown parameter names), ``vocabulary_services``
(``~/set_vocabulary``, ``~/segment``), ``running`` (the process: signals, spin loop).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rclpy.clock import Clock
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import SetBool

from ovss_ros.core import ClassEntry, EngineConfig
from ovss_ros.ros import parameters
from ovss_ros.ros.cameras import Camera, CameraSet
from ovss_ros.ros.change_encoder import ChangeEncoder, stop_change_encoder
from ovss_ros.ros.depth_outputs import DepthOutputs
from ovss_ros.ros.executor_work import ExecutorWork
from ovss_ros.ros.frames import Frame, FrameLedger
from ovss_ros.ros.log_text import describe
from ovss_ros.ros.node_diagnostics import EngineState, NodeDiagnostics
from ovss_ros.ros.processing import LOG_THROTTLE_S, FrameProcessor
from ovss_ros.ros.request_guard import CallbackFaults, guard_services
from ovss_ros.ros.running import NODE_NAME, START_ERRORS, run, stop_event
from ovss_ros.ros.signals import ShutdownSignals
from ovss_ros.ros.transactions import ParameterTransactions
from ovss_ros.ros.undeclared import (
    UndeclaredRefusal,
    refuse_renamed_overrides,
    report_undeclared_overrides,
)
from ovss_ros.ros.vocabulary_services import VocabularyServices
from ovss_ros.ros.worker import FrameBuffer, FrameWorker, stop_worker

if TYPE_CHECKING:
    from ovss_ros.core.segmenter import Segmenter

__all__ = ["NODE_NAME", "START_ERRORS", "OvssNode", "SegmentationNodeMixin", "main", "run"]

# Changes after which the node says which method runs (it may now run without a checkpoint).
METHOD_CHANGES = {"method", "deop.checkpoint", "deop.proposal_source", "deop.pooling"}


class SegmentationNodeMixin(UndeclaredRefusal):
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
        self._enabled = threading.Event()  # ~/enable
        self._enabled.set()
        self._active = threading.Event()  # inputs subscribed (lifecycle: active)
        self._inactive_reason = inactive_reason
        self._buffer: FrameBuffer[Frame] = FrameBuffer()
        self._worker: FrameWorker[Frame] | None = None
        self._changes: ChangeEncoder | None = None  # prepares changes beside the worker
        self.cameras = CameraSet(self, ())
        self.frames = FrameLedger()
        self.depth = DepthOutputs(self)  # labels in 3D (depth.*): a no-op unless enabled
        self.typed_services: VocabularyServices | None = None  # made below too
        self.processor = FrameProcessor(
            self.frames,
            logger=self.get_logger,
            clock=self.get_clock,
            running=self._running,
            segmenter=lambda: self.segmenter,
            settings=lambda: self.transactions.applied_settings,
            on_error=self._on_worker_error,
            after_publish=self.depth.publish,
        )
        # Exceptions in callbacks (a malformed request, ...): counted, each kind logged once.
        self.callback_faults = CallbackFaults(self.get_logger().warning)
        self._executor_work: ExecutorWork | None = None  # made below, with the other entities
        self._overrides_reported: set[str] = set()
        refuse_renamed_overrides(self)
        values = parameters.declare_parameters(self)
        report_undeclared_overrides(self, self._overrides_reported, qos=False)
        self.transactions = ParameterTransactions(
            self,
            values,
            self.callback_faults,
            check=self._check_change,
            wake=self._wake_change_encoder,
        )
        self.cameras = CameraSet(self, self.transactions.settings.cameras)
        self.cameras.check_topics()
        self.cameras.check_mask_topics(self.transactions.settings.classes)
        changes = self.transactions  # the depth settings: those in force, else those accepted
        self.depth.setup(self.cameras, lambda: changes.applied_settings or changes.settings)

        self.transactions.install()
        # The worker asks the executor thread to make and unmake mask topics (ExecutorWork).
        self._executor_work = ExecutorWork(self, on_error=self._on_executor_work_error)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self.typed_services = VocabularyServices(self, wake=lambda: self._buffer.wake())
        self.diagnostics = NodeDiagnostics(
            self,
            self.cameras,
            self.callback_faults,
            self._engine_state,
            more=(self.depth.statuses, self.typed_services.statuses),
        )
        # Every service answers, whatever a request holds (request_guard).
        guard_services(self, self.callback_faults)

    def _load(self) -> None:
        """Load the model and encode the vocabulary (seconds); raises START_ERRORS."""
        settings, values = self.transactions.begin_load()
        from ovss_ros.core.segmenter import Segmenter  # torch: only once the settings are good

        self.segmenter = Segmenter(settings.engine, stop=stop_event(self))
        self._device = str(self.segmenter.device)
        self._check_model_fit(settings.engine)
        self.segmenter.set_classes(settings.classes)
        self.transactions.loaded(values, settings)
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
        self.cameras.open_outputs(self._wanted_masks())
        self.depth.open()
        self._publish_label_info()
        self._buffer = FrameBuffer()
        # The engine's stop event (stop_event) ends the worker and the change encoder too.
        self._worker = FrameWorker(
            self._buffer,
            self.processor.process,
            self.typed_services.between_frames(self._apply_pending),
            self._on_worker_error,
            stop=stop_event(self),
            start=self.segmenter.side.frame_thread if self.segmenter is not None else None,
            after_frames=self.typed_services.run_segment_job,
        )
        self._changes = ChangeEncoder(
            self.transactions,
            lambda: self.segmenter,
            hand_over=self._buffer.wake,
            stop=stop_event(self),
            on_error=self._on_worker_error,
        )
        self._worker.start()
        self._changes.start()
        if self.transactions.pending:  # accepted between loading and now
            self._changes.wake()

    def _start(self) -> None:
        self._active.set()
        self.cameras.subscribe(self.transactions.settings.image_transport, self._on_image)
        self.depth.subscribe()
        # Every qos_overrides.* the node knows is declared now: outputs and inputs exist.
        report_undeclared_overrides(self, self._overrides_reported, qos=True)

    def _stop(self) -> None:
        self._active.clear()
        self.cameras.unsubscribe()
        self.depth.unsubscribe()
        self._clear_frames()

    def _close(self) -> None:
        """Stop the worker, then destroy the outputs it publishes with.

        The stop event ends the engine's current step (text encoding, an inference stage) with
        Stopped, and the worker ends without publishing more; only then do the publishers go, so
        nothing is published on a destroyed publisher or a context that is shut down. Should
        the worker still be busy after WORKER_STOP_TIMEOUT_S, its errors are not reported (it is
        stopping) and the process entry does not wait for it (``entry.run_main``). The next
        configure gets a fresh stop event.
        """
        stop_event(self).set()
        worker, self._worker = self._worker, None
        changes, self._changes = self._changes, None
        stop_worker(worker, self.get_logger().warning)
        stop_change_encoder(changes, self.get_logger().warning)
        if self.typed_services is not None:  # requests waiting for the worker: answered
            self.typed_services.close()
        if self._executor_work is not None:  # mask topics the worker asked for: not needed now
            self._executor_work.cancel()
        self.cameras.close_outputs()
        self.depth.close()
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
        frame, previous = self.frames.admit(camera, message, self.get_clock().now())
        if self._buffer.put(frame, slot=camera.name):
            if previous is not None:  # put replaced the frame this camera put last
                self.frames.settle(previous, "dropped_overwritten")
        elif self._buffer.closed:  # shutting down: no worker will take it
            self.frames.settle(frame, "dropped_paused")

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

    def _check_change(self, settings: parameters.Settings, changes: Mapping[str, Any]) -> None:
        """What only the node can check of a requested configuration (``transactions``): the
        loaded model's limits, and the new vocabulary's mask topics. Raises ValueError."""
        self._check_model_fit(settings.engine, settings.classes)
        if "classes" in changes:
            self.cameras.check_mask_topics(settings.classes)

    def _check_model_fit(self, engine: EngineConfig, classes: list[ClassEntry] | None = None):
        """What EngineConfig.validate cannot check: settings that depend on the loaded model's
        patch size, a vocabulary against what the loaded method can take (PnP-OVSS: the prompt
        within the VLM's text positions); before loading, the next configure does. ValueError."""
        if self.segmenter is not None:
            self.segmenter.check_config(engine, classes)

    def _clear_frames(self) -> None:
        """Pausing or stopping: the frames waiting are dropped and counted (one being
        published is counted when it is out)."""
        self._buffer.clear()
        self.frames.drop_waiting()

    def _engine_state(self) -> EngineState:
        segmenter = self.segmenter
        return EngineState(
            loaded_device=self._device,
            configured_device=self.transactions.values["device"],
            vocabulary_size=len(segmenter.classes) if segmenter is not None else 0,
            running=self._running(),
            not_enabled_reason=(
                "inference paused (~/enable)" if self._active.is_set() else self._inactive_reason
            ),
            parameter_change=self.transactions.change,
        )

    # Worker thread: owns the Segmenter.

    def _wake_change_encoder(self) -> None:
        if self._changes is not None:  # accepted changes wait (executor thread)
            self._changes.wake()

    def _apply_pending(self) -> None:
        """Between two frames: put the prepared change in force or settle its failure
        (``transactions``), say so, update mask topics and label_info (also after a failure)."""
        changes = self._changes
        handover = changes.take() if changes is not None else None
        if handover is None:
            return
        try:
            failure = self.transactions.commit(self.segmenter, handover)
        finally:
            changes.done()
        if failure is None and METHOD_CHANGES & set(handover.changes):
            self._log_method()
        if "classes" in handover.changes and failure is None:
            names = ", ".join(parameters.quoted(e.name) for e in self.segmenter.classes)
            self.get_logger().info(f"vocabulary: {names}")
        if self._update_masks():
            self._publish_label_info()
        self.typed_services.settled(handover.accepted, failure)  # ~/set_vocabulary answered

    def _update_masks(self) -> bool:
        """Have the executor's thread make the mask topics match the vocabulary in force and
        wait: the next frame is published with them. False if the node stopped first."""
        steps = self.cameras.mask_steps(self._wanted_masks())
        return self._executor_work.run(steps, stop_event(self))

    def _on_executor_work_error(self, error: BaseException) -> None:
        self.get_logger().error(f"mask topics: {describe(error)}")

    def _publish_label_info(self) -> None:
        if self.segmenter is None:
            return
        names = [entry.name for entry in self.segmenter.classes]
        threshold = self.segmenter.config.score_threshold
        self.cameras.publish_label_info(self.get_clock().now().to_msg(), names, threshold)

    def _wanted_masks(self) -> dict[str, str]:
        """Class name -> slug of the mask topics there should be (none with publish_masks off)."""
        settings = self.transactions.applied_settings
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


def main(args: list[str] | None = None, signals: ShutdownSignals | None = None) -> int:
    return run(OvssNode, args, signals)


if __name__ == "__main__":
    # The console script (entry.ovss_node) installs its handlers before these imports.
    from ovss_ros.ros.entry import answered_help, run_main

    sys.exit(0 if answered_help("ovss_node") else run_main(main))
