"""The managed node's transitions while a parameter change encodes, over real DDS.

The lifecycle node runs in its own process with test/fault_injection_node.py's encoding gate (a
class with ``hold_encoding`` keeps its text encoding going until the test releases it, and ends
the wait with Stopped on the node's stop). Deactivate leaves the change encoding (frames stop,
not the change); cleanup stops it at once, cleanly (no thread left behind); the accepted
vocabulary is the one the next configure loads, whole, and shutdown ends the process with 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rclpy
from fault_injection_node import HOLD_WORD, MODULE
from lifecycle_msgs.msg import Transition
from rclpy.parameter import Parameter
from ros_harness import (
    EVENT_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    Lifecycle,
    NodeProcess,
    OvssClient,
    image_array,
    isolate_dds,
    make_image,
    next_header,
)

CLASSES = ["cat", "dog"]
CHANGED = [f"{HOLD_WORD} at cleanup", "bird"]


@pytest.fixture()
def managed(tmp_path, monkeypatch):
    isolate_dds()
    test_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [test_dir, os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("OVSS_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("OVSS_FAULT_LIFECYCLE", "1")
    process = NodeProcess(TINY_NODE_PARAMETERS | {"classes": CLASSES}, module=MODULE)
    rclpy.init()
    client = OvssClient("/ovss", "")
    try:
        yield client, process, Lifecycle(client, "/ovss"), tmp_path
    finally:
        client.destroy()
        rclpy.shutdown()
        (tmp_path / "encoding_release").touch()  # never leave an encoding held at shutdown
        returncode = process.stop()
    assert returncode == 0, process.output()


def segment(client, rgb) -> list[str]:
    message = make_image(rgb, "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "label_info"))
    assert int(image_array(out["labels"]).max()) < len(out["label_info"].class_map)
    return [entry.class_name for entry in out["label_info"].class_map]


def test_deactivate_keeps_and_cleanup_stops_an_encoding_and_configure_loads_it(managed, voc_rgb):
    client, process, lifecycle, fault_dir = managed
    held, release = fault_dir / "encoding_held", fault_dir / "encoding_release"
    rgb = np.ascontiguousarray(voc_rgb[1][:96, :128])
    lifecycle.activate()
    client.spin_until(client.ready, 2 * EVENT_TIMEOUT_S, "inputs subscribed")
    assert segment(client, rgb) == CLASSES

    result = client.set_parameters([Parameter("classes", value=CHANGED)])[0]
    assert result.successful, result.reason
    client.spin_until(held.exists, message="encoding held")
    assert segment(client, rgb) == CLASSES  # frames flow while it encodes
    assert lifecycle.transition(Transition.TRANSITION_DEACTIVATE)
    assert held.exists()  # deactivate stops the frames, not the change
    assert lifecycle.transition(Transition.TRANSITION_CLEANUP)
    assert not held.exists() and not release.exists()  # stopped by the cleanup, not released
    assert "still busy" not in process.output()  # no thread left behind
    assert client.get_parameter("classes") == CHANGED  # accepted: the next configure's

    configure = lifecycle.request(Transition.TRANSITION_CONFIGURE)
    client.spin_until(held.exists, message="configure encodes the accepted vocabulary")
    release.touch()
    client.spin_until(configure.done, message="configure answered")
    assert configure.result().success
    assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
    client.spin_until(client.ready, 2 * EVENT_TIMEOUT_S, "inputs subscribed again")
    assert segment(client, rgb) == CHANGED
    assert client.get_parameter("classes") == CHANGED


def test_the_shutdown_transition_stops_an_encoding_at_once(managed, voc_rgb):
    client, process, lifecycle, fault_dir = managed
    held, release = fault_dir / "encoding_held", fault_dir / "encoding_release"
    lifecycle.activate()
    client.spin_until(client.ready, 2 * EVENT_TIMEOUT_S, "inputs subscribed")
    result = client.set_parameters([Parameter("classes", value=CHANGED)])[0]
    assert result.successful, result.reason
    client.spin_until(held.exists, message="encoding held")
    assert lifecycle.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert not held.exists() and not release.exists()  # stopped by the shutdown
    assert "still busy" not in process.output()
