"""The node's /diagnostics: one DiagnosticStatus per camera, once a second on steady time.

The reports themselves are made without ROS in ``diagnostics`` (``camera_report``); here the node
gathers what they say (the engine's state, each camera's window of frame outcomes and input, the
graph: other nodes with this node's name), publishes them, and logs what an operator must see
even without a diagnostics viewer: an input that went silent (once per silence) and a node of
the same name that joined the graph. Steady time: diagnostics go on while a paused bag holds the
simulated clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.clock import Clock, ClockType
from rclpy.node import Node

from ovss_ros.ros.cameras import Camera, CameraSet
from ovss_ros.ros.diagnostics import (
    SILENT_INPUT_S,
    InputState,
    NodeState,
    camera_report,
    duplicate_node_message,
    silent_input_message,
    status_message,
)
from ovss_ros.ros.log_text import describe
from ovss_ros.ros.request_guard import CallbackFaults

DIAGNOSTICS_PERIOD_S = 1.0


@dataclass(frozen=True)
class EngineState:
    """What the node tells diagnostics about its engine at one moment."""

    loaded_device: str  # of the loaded model ("" before loading; kept after unloading)
    configured_device: str  # the device parameter
    vocabulary_size: int
    running: bool  # active and enabled
    not_enabled_reason: str
    parameter_change: tuple[str, bool]  # (diagnostics text, failed)


class NodeDiagnostics:
    """Publishes the node's /diagnostics from a timer on the executor thread: one
    DiagnosticArray a tick, the cameras' statuses and then those of ``more``."""

    def __init__(
        self,
        node: Node,
        cameras: CameraSet,
        faults: CallbackFaults,
        engine_state: Callable[[], EngineState],
        more: Sequence[Callable[[], list[DiagnosticStatus]]] = (),
    ) -> None:
        self._node = node
        self._more = list(more)  # more statuses for the same array (depth, ~/segment)
        self._cameras = cameras
        self._faults = faults
        self._engine_state = engine_state
        self._duplicates_logged = 0
        self._publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Steady time: diagnostics go on while a paused bag holds the simulated clock.
        node.create_timer(
            DIAGNOSTICS_PERIOD_S, self.publish, clock=Clock(clock_type=ClockType.STEADY_TIME)
        )

    def publish(self) -> None:
        engine = self._engine_state()
        change, change_failed = engine.parameter_change
        device = engine.loaded_device
        state = NodeState(
            device=device or engine.configured_device,
            vocabulary_size=engine.vocabulary_size,
            enabled=engine.running,
            gpu_memory_mib=gpu_memory_mib(device) if device else None,
            not_enabled_reason=engine.not_enabled_reason,
            parameter_change=change,
            parameter_change_failed=change_failed,
            duplicate_nodes=self._check_duplicate_name(),
            node_name=self._node.get_fully_qualified_name(),
            callback_errors=self._faults.total,
            recent_callback_errors=self._faults.recent(),
        )
        array = DiagnosticArray()
        array.header.stamp = self._node.get_clock().now().to_msg()
        for camera in self._cameras:
            input_state = camera.input_state()
            self._log_silent_input(camera, input_state)
            report = camera_report(camera.stats.window(), state, input_state)
            array.status.append(
                status_message(f"{self._node.get_name()}: {camera.name}", state.device, report)
            )
        for statuses in self._more:
            array.status.extend(statuses())
        self._publisher.publish(array)

    def _log_silent_input(self, camera: Camera, input_state: InputState | None) -> None:
        """Log the diagnostics' silent-input WARN once per silence (it names the fix)."""
        silent = input_state is not None and (input_state.silent_s or 0.0) >= SILENT_INPUT_S
        if silent and not camera.silence_logged:
            self._node.get_logger().warning(
                f"camera {camera.name}: {silent_input_message(input_state)}"
            )
        camera.silence_logged = silent

    def _check_duplicate_name(self) -> int:
        """How many other nodes in the graph have this node's fully qualified name; logged when
        the number grows (discovery: a late joiner sees the whole graph within seconds)."""
        own = self._node.get_fully_qualified_name()
        try:
            others = self._node.get_fully_qualified_node_names().count(own) - 1
        except Exception as error:  # a graph query: never worth the diagnostics
            self._node.get_logger().debug(f"graph query failed: {describe(error)}")
            return self._duplicates_logged
        if others > self._duplicates_logged:
            self._node.get_logger().warning(duplicate_node_message(own, others))
        self._duplicates_logged = max(others, 0)
        return self._duplicates_logged


def gpu_memory_mib(device: object) -> tuple[float, float] | None:
    """(allocated, reserved) MiB on a CUDA device as torch's allocator sees it, else None."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch  # only reached on CUDA, where the engine has imported it already

    return (
        torch.cuda.memory_allocated(device) / 2**20,
        torch.cuda.memory_reserved(device) / 2**20,
    )
