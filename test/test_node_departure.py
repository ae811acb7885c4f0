"""A node process that exits leaves the ROS graph at once: a restarted node is reachable at once.

A participant that ends without announcing it stays in the other processes' graph until its DDS
lease runs out (Fast DDS: 20 s). The managed node used to do exactly that: rclpy's
``LifecycleNode.destroy_node`` leaves the lifecycle state machine alive, the state machine keeps
the rcl node (and with it the participant) from being finalized, and the process exited with its
name and ``~/change_state`` still announced. A client that restarted the node and called
``configure`` as soon as ``~/change_state`` showed up (nav2's lifecycle manager, a respawn)
reached the departed process and got no answer.

Every case watches from another process (this one) over real DDS: the node's name, every one of
its services and every topic it publishes must be gone from the graph within DEPARTURE_S of the
process's exit.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import rclpy
from lifecycle_msgs.msg import Transition
from ros_harness import (
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    Lifecycle,
    NodeProcess,
    OvssClient,
    isolate_dds,
    make_image,
    next_header,
    published_topics,
    spin_until,
)

PLAIN, MANAGED = "ovss_node", "ovss_lifecycle_node"
PARAMETERS = TINY_NODE_PARAMETERS | {"classes": ["cat", "dog"]}
# From the process's exit to its last trace in another process's graph. An announced departure
# takes well under a second on an idle machine and took over 2 s with a load average of 6 on two
# cores; a participant that leaves unannounced stays for its whole lease (Fast DDS: 20 s), so
# half the lease still tells the two apart.
DEPARTURE_S = 10.0


@pytest.fixture
def observer() -> Iterator[OvssClient]:
    isolate_dds()
    rclpy.init()
    client = OvssClient(node_namespace="/departure/ovss", input_namespace="/departure")
    yield client
    client.destroy()
    rclpy.shutdown()


def traces(client: OvssClient) -> list[str]:
    """What of the node ``/departure/ovss`` the observer's graph still shows."""
    node = client.node
    found = [
        f"node {namespace}/{name}"
        for name, namespace in node.get_node_names_and_namespaces()
        if (namespace, name) == ("/departure", "ovss")
    ]
    found += [  # servers only: the observer's own clients keep some names in the graph
        f"service {name}"
        for name, _types in node.get_service_names_and_types()
        if name.startswith("/departure/ovss/") and node.count_services(name) > 0
    ]
    found += [f"topic {name}" for name in published_topics(node, "/departure/ovss/")]
    return found


def start(executable: str) -> NodeProcess:
    return NodeProcess(
        PARAMETERS, extra_ros_args=["-r", "__ns:=/departure"], executable=executable
    )


def exit_and_assert_departed(client: OvssClient, process: NodeProcess) -> None:
    """Ctrl-C the node; once it has exited cleanly, it must vanish within DEPARTURE_S."""
    assert traces(client), "the node was never seen in the graph"
    process.send_signal(signal.SIGINT)
    status = process.wait(STOP_TIMEOUT_S)
    exited = time.monotonic()
    assert status == 0, process.output()
    # Discovery news is processed in the background; spin so that nothing else holds it up.
    try:
        spin_until(client.node, lambda: not traces(client), DEPARTURE_S)
    except AssertionError:
        raise AssertionError(
            f"{time.monotonic() - exited:.1f} s after the exit the graph still shows "
            f"{traces(client)}"
        ) from None


def test_the_plain_node_leaves_the_graph_when_it_exits(observer):
    process = start(PLAIN)
    try:
        observer.spin_until(
            lambda: process.returncode is not None or observer.ready(),
            STARTUP_TIMEOUT_S,
            message=lambda: (
                f"node start-up; its output:\n{process.output()}"
                f"\nthe client:\n{observer.describe()}"
            ),
        )
        # Serving is spinning: the node is in the graph (and has published its label_info)
        # a moment before it spins, and a Ctrl-C in that moment ends start-up (status 130).
        # A segmented frame is proof of the spin.
        frame = np.zeros((32, 48, 3), dtype=np.uint8)
        observer.wait_for_output(make_image(frame, "rgb8", next_header(observer.node)))
        exit_and_assert_departed(observer, process)
    finally:
        process.stop()
        process.log_path.unlink(missing_ok=True)


DROPPED = "failed to send response"


def test_a_restarted_managed_node_answers_configure_at_once(observer):
    """Serving managed node exits; the next one (same name) is configured as soon as its
    ``~/change_state`` shows up, then shut down (finalized) and exits: each exit leaves the
    graph within DEPARTURE_S."""
    lifecycle = Lifecycle(observer, "/departure/ovss")
    first = start(MANAGED)
    second = None
    try:
        assert lifecycle.state(STARTUP_TIMEOUT_S) == "unconfigured", first.output()
        lifecycle.activate()
        observer.spin_until(observer.ready, message=lambda: first.output())
        exit_and_assert_departed(observer, first)

        second = start(MANAGED)
        spin_until(observer.node, lifecycle.change.service_is_ready, STARTUP_TIMEOUT_S)
        # One configure, as nav2's lifecycle manager sends it: no state read first, no retry.
        # Only a response the node's middleware reports as dropped ("failed to send response",
        # the documented case a client must retry) lets the request be sent again.
        configure = lifecycle.request(Transition.TRANSITION_CONFIGURE)
        spin_until(
            observer.node,
            lambda: configure.done() or DROPPED in second.output(),
            STARTUP_TIMEOUT_S,
            message=lambda: f"configure unanswered, no response dropped:\n{second.output()}",
        )
        if configure.done():
            assert configure.result().success, second.output()
        else:
            assert lifecycle.transition(Transition.TRANSITION_CONFIGURE), second.output()
        assert "cannot configure" not in second.output()
        assert lifecycle.state() == "inactive"
        assert lifecycle.transition(Transition.TRANSITION_INACTIVE_SHUTDOWN), second.output()
        assert lifecycle.state() == "finalized"
        exit_and_assert_departed(observer, second)
    finally:
        for process in (first, second):
            if process is not None:
                process.stop()
                process.log_path.unlink(missing_ok=True)
