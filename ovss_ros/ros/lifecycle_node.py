"""The ovss node as a managed (lifecycle) node: the robot decides when the model takes memory.

Same contract, parameters and code as ``ovss_ros.ros.node`` (``SegmentationNodeMixin``); only when
things happen differs, driven through the standard lifecycle services (``~/change_state``,
``~/get_state``), e.g. by nav2's lifecycle manager or ``ros2 lifecycle set /ovss configure``:

- construction (unconfigured): parameters declared and checked, ``~/enable`` and /diagnostics
  up; no model, no topics.
- configure: load the model and encode the vocabulary (seconds), create the outputs and the
  worker thread. A model that cannot be loaded fails the transition with one clear log line, and
  the node stays unconfigured.
- activate: subscribe the inputs; frames are segmented and published.
- deactivate: unsubscribe; a frame in flight is not published.
- cleanup: stop the worker, remove the outputs, free the model (and the CUDA cache, so the
  memory shows as free to other processes too).
- shutdown, from any state: all of the above that applies.

Read-only parameters (model, device, cameras, ...) stay read-only: a different model needs a new
process, as with the plain node.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from rclpy.exceptions import NameValidationException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from ovss_ros.ros.node import SegmentationNodeMixin
from ovss_ros.ros.running import NODE_NAME, START_ERRORS, run, stop_event
from ovss_ros.ros.signals import ShutdownSignals


class OvssLifecycleNode(SegmentationNodeMixin, LifecycleNode):
    """The ovss node, loading its model on configure and serving while active."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        try:
            self._setup(inactive_reason="not active (lifecycle)")
        except BaseException:
            self.destroy_node()
            raise

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        stopping = stop_event(self)  # a shutdown signal sets it: loading ends early (Stopped)
        try:
            self._load()
            self._open()
        except Exception as error:
            interrupted = stopping.is_set()  # before _release, which sets it
            self._release()
            if interrupted:
                self.get_logger().info("configure interrupted: shutting down")
                return TransitionCallbackReturn.FAILURE
            if not isinstance(error, (*START_ERRORS, NameValidationException)):
                raise
            # rclpy's lifecycle swallows exceptions without a word: say what went wrong here.
            self.get_logger().error(f"cannot configure: {error}")
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._start()
        self.get_logger().info("active: segmenting")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop()
        self.get_logger().info("inactive: inputs unsubscribed")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("unconfigured: model released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop()
        self._release()
        self.get_logger().info("finalized")
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: return to unconfigured with nothing held."""
        self.get_logger().error(f"error while {state.label}: releasing everything")
        self._stop()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        """Close the outputs and the worker, then free the model's memory."""
        device = self._device
        self._close()
        self._unload()
        gc.collect()  # the model's tensors may sit in reference cycles (open_clip modules)
        if device.startswith("cuda"):
            import torch  # loaded already: the engine brought it

            torch.cuda.empty_cache()

    def destroy_node(self) -> None:
        if hasattr(self, "cameras"):  # _setup got that far
            self._stop()
            self._release()
        super().destroy_node()
        # rclpy's LifecycleNode.destroy_node leaves its state machine alive, and the state
        # machine holds the rcl node: neither the node nor the process's DDS participant were
        # ever finalized, so the process exited without announcing its departure and stayed in
        # the other processes' graph (name, ~/change_state) until its lease ran out (20 s). A
        # restarted node's configure could reach the departed one and never be answered.
        self._state_machine.destroy_when_not_in_use()


def main(args: list[str] | None = None, signals: ShutdownSignals | None = None) -> int:
    return run(OvssLifecycleNode, args, signals)


if __name__ == "__main__":
    # The console script (entry.ovss_lifecycle_node) installs its handlers before imports.
    from ovss_ros.ros.entry import answered_help, run_main

    sys.exit(0 if answered_help("ovss_lifecycle_node") else run_main(main))
