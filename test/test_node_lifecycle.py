"""The managed node (ovss_ros.ros.lifecycle_node) over real DDS, driven by the lifecycle services.

What each state must mean to the rest of the graph: unconfigured, no model and no outputs;
inactive, outputs but no input subscription; active, frames in and results out; cleanup, back to
nothing (the model freed); shutdown from any state. A model that cannot be loaded fails configure
with one clear line and leaves the node unconfigured.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import rclpy
from lifecycle_msgs.msg import Transition
from rclpy.parameter import Parameter
from ros_harness import (
    EVENT_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    VOC_IMAGES,
    Lifecycle,
    NodeProcess,
    OvssClient,
    isolate_dds,
    make_image,
    next_header,
    shutdown_problems,
    startup_timeout,
    status_values,
)

CLASSES = ["cat", "dog", "person"]
EXECUTABLE = "ovss_lifecycle_node"  # the console script, as `ros2 run ovss_ros ...` starts it
MISSING = "/nonexistent/ovss/weights.pt"


@pytest.fixture(scope="module")
def nodes():
    """The managed node, and a second one whose checkpoint is missing (started together)."""
    isolate_dds()
    managed = NodeProcess(TINY_NODE_PARAMETERS | {"classes": CLASSES}, executable=EXECUTABLE)
    broken = NodeProcess(
        TINY_NODE_PARAMETERS | {"pretrained": MISSING},
        extra_ros_args=["-r", "__node:=ovss_broken"],
        executable=EXECUTABLE,
    )
    rclpy.init()
    client = OvssClient()
    try:
        yield client, managed, broken
    finally:
        client.destroy()
        rclpy.shutdown()
        codes = {"managed": managed.stop(), "broken": broken.stop()}
    for name, process in (("managed", managed), ("broken", broken)):
        assert codes[name] == 0, f"{name} did not shut down cleanly:\n{process.output()}"
        assert "SIGINT: shutting down" in process.output(), process.output()
        process.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    path = sorted(VOC_IMAGES.glob("*.jpg"))[0]
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def publishers(client: OvssClient, topic: str) -> int:
    return client.node.count_publishers(topic)


def test_configure_activate_deactivate_cleanup_shutdown(nodes, rgb):
    client, process, _ = nodes
    lifecycle = Lifecycle(client, "/ovss")
    labels = client.topic("labels")

    # Unconfigured: parameters and diagnostics, no model and no topics. The process may still be
    # importing torch (seconds, more on a busy machine; two start together): a start-up's limit.
    assert lifecycle.state(timeout=startup_timeout(2)) == "unconfigured", process.output()
    status = client.wait_for_status("ovss: image", bool)
    values = status_values(status)
    assert values["enabled"] == "false" and values["vocabulary size"] == "0"
    assert "not active" in status.message
    assert publishers(client, labels) == 0 and client.image_pub.get_subscription_count() == 0
    # Runtime parameters can be changed before configure; configure uses them.
    result = client.set_parameters([Parameter("classes", value=["sofa", "plant; potted plant"])])
    assert result[0].successful, result[0].reason

    # Configure: the model is loaded and the outputs exist; no input yet.
    assert lifecycle.transition(Transition.TRANSITION_CONFIGURE), process.output()
    assert lifecycle.state() == "inactive"
    client.spin_until(lambda: publishers(client, labels) == 1, message="~/labels publisher")
    info = client.spin_until(lambda: client.messages[client.topic("label_info")])
    assert [entry.class_name for entry in info[-1].class_map] == ["sofa", "plant"]
    assert client.image_pub.get_subscription_count() == 0

    # Activate: frames in, results out.
    assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
    assert lifecycle.state() == "active"
    client.spin_until(client.inputs_matched, 2 * EVENT_TIMEOUT_S, "image matched on both sides")
    first = make_image(rgb, "rgb8", next_header(client.node))
    out = client.wait_for_output(first, ("labels", "label_info"))
    assert (out["labels"].height, out["labels"].width) == rgb.shape[:2]
    status = client.wait_for_status("ovss: image", lambda v: v["frames processed"] != "0")
    assert status_values(status)["enabled"] == "true"

    # Deactivate: the input is unsubscribed, nothing is published.
    assert lifecycle.transition(Transition.TRANSITION_DEACTIVATE)
    assert lifecycle.state() == "inactive"
    client.spin_until(
        lambda: client.image_pub.get_subscription_count() == 0, message="unsubscribed"
    )
    ignored = make_image(rgb, "rgb8", next_header(client.node))
    client.image_pub.publish(ignored)
    client.spin_for(0.5)
    assert client.find("labels", ignored.header) is None
    assert publishers(client, labels) == 1

    # Cleanup: the outputs go, the model is freed.
    assert lifecycle.transition(Transition.TRANSITION_CLEANUP)
    assert lifecycle.state() == "unconfigured"
    client.spin_until(lambda: publishers(client, labels) == 0, message="~/labels removed")
    client.wait_for_status("ovss: image", lambda v: v["vocabulary size"] == "0")

    # And again, up to active: the model is loaded anew.
    assert lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
    client.spin_until(client.inputs_matched, 2 * EVENT_TIMEOUT_S, "image matched on both sides")
    again = make_image(rgb, "rgb8", next_header(client.node))
    client.wait_for_output(again, ("labels",))

    # Shutdown straight from active.
    assert lifecycle.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert lifecycle.state() == "finalized"
    client.spin_until(
        lambda: publishers(client, labels) == 0 and client.image_pub.get_subscription_count() == 0,
        message="everything released at shutdown",
    )
    assert process.returncode is None, process.output()
    assert shutdown_problems(process.output()) == [], process.output()


def test_a_model_that_cannot_load_fails_configure_and_stays_unconfigured(nodes):
    client, _, process = nodes
    lifecycle = Lifecycle(client, "/ovss_broken")
    assert lifecycle.state(timeout=startup_timeout(2)) == "unconfigured", process.output()
    assert not lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.state() == "unconfigured"
    errors = [line for line in process.output().splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "cannot configure" in errors[0] and MISSING in errors[0], errors
    # Shutdown from unconfigured.
    assert lifecycle.transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
    assert lifecycle.state() == "finalized"
