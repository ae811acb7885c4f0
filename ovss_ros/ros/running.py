"""Running an ovss node in its process: start-up errors as one line, signals, the spin loop.

``run`` makes the node, spins it until SIGINT or SIGTERM (``signals.ShutdownSignals``, installed
by ``entry`` before the heavy imports), then destroys the node (worker stopped first, then its
publishers) and only then shuts the ROS context down; rclpy's own signal handlers stay out (they
would shut the context down while the worker still publishes). ``stop_event`` is the event that
stops a node's engine and worker; ``spin_until_stopped`` survives an exception out of a callback
(``request_guard``: nothing that arrives over DDS ends the node).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import rclpy
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    NameValidationException,
)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from ovss_ros.core import ModelLoadError
from ovss_ros.ros.log_text import describe
from ovss_ros.ros.signals import Interrupted, ShutdownSignals

NODE_NAME = "ovss"
# What makes start-up fail with one clear message instead of a traceback.
START_ERRORS = (
    ModelLoadError,
    ValueError,
    InvalidParameterTypeException,
    InvalidParameterValueException,
)


def run(
    make_node: Callable[[], Node],
    args: list[str] | None = None,
    signals: ShutdownSignals | None = None,
) -> int:
    """Run a node until SIGINT or SIGTERM; return the process's exit status.

    0 after a signal while serving (or a context shut down from elsewhere); 1 with one clear
    message if the node cannot start; 128 + the signal number if a signal ended start-up.
    ``signals``: the handlers ``entry`` installed before the heavy imports; installed here
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


# How soon at most the spin loop notices a signal: Python runs its handlers between bytecodes,
# not while the executor waits. (Each wake-up costs CPU: 0.1 s cost 0.7 % of a core idle.)
SPIN_POLL_S = 0.5
SPIN_ERROR_PAUSE_S = 0.01


def stop_event(node: Node) -> threading.Event:
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
