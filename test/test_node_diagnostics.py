"""/diagnostics over real DDS, and QoS overrides of the outputs.

The input is RELIABLE on both sides (an override of the node's subscription), and every frame is
sent only once the previous one is accounted for, so that the node's counters must equal what this
test sent: nothing lost in transport, nothing overwritten in the newest-frame slot.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, ReliabilityPolicy, qos_profile_sensor_data
from ros_harness import (
    TINY_NODE_PARAMETERS,
    VOC_IMAGES,
    make_image,
    next_header,
    running_node,
    status_values,
)
from sensor_msgs.msg import Image
from test_diagnostics import KEYS as DIAGNOSTIC_KEYS

CLASSES = ["cat", "dog", "person"]
STATUS = "ovss: image"
KEYS = set(DIAGNOSTIC_KEYS)  # every key the status computation writes
OUTPUT_OVERRIDES = {
    "qos_overrides./ovss/labels.publisher.reliability": "best_effort",
    "qos_overrides./ovss/labels.publisher.depth": "1",
    "qos_overrides./ovss/label_info.publisher.depth": "3",
    "qos_overrides./ovss/confidence.publisher.durability": "transient_local",
}

# Far beyond any wait of a fresh frame on a loaded machine (at 10 s, a fresh frame waiting behind
# a parameter change under a CPU hog went stale: test_node_accounting.py).
MAX_FRAME_AGE_S = 60.0


pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node():
    overrides = {"qos_overrides./image.subscription.reliability": "reliable", **OUTPUT_OVERRIDES}
    extra = [arg for name, value in overrides.items() for arg in ("-p", f"{name}:={value}")]
    parameters = TINY_NODE_PARAMETERS | {"classes": CLASSES, "max_frame_age": MAX_FRAME_AGE_S}
    with running_node(parameters, extra_ros_args=extra, reliable_input=True) as (client, process):
        # ~/labels (and so the masks) are best effort now: a reliable reader would not match.
        client.unsubscribe(client.topic("labels"))
        client.subscribe(client.topic("labels"), Image, qos_profile_sensor_data)
        client.subscribe(client.topic("masks/cat"), Image, qos_profile_sensor_data)
        yield client, process


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    path = sorted(VOC_IMAGES.glob("*.jpg"))[0]
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_diagnostics_count_exactly_the_frames_sent(client, rgb):
    def counted(key: str, value: int) -> None:
        client.wait_for_status(STATUS, lambda values: values[key] == str(value))

    good = [make_image(rgb, "rgb8", next_header(client.node)) for _ in range(3)]
    for message in good:  # sent once each (no resend): the output proves it was processed
        client.wait_for_output(message, ("labels",), resend_every=1e9)

    unknown = make_image(rgb, "yuv_strange", next_header(client.node))
    truncated = make_image(rgb, "rgb8", next_header(client.node))
    truncated.data = truncated.data[: len(truncated.data) // 2]
    for count, message in enumerate((unknown, truncated), start=1):
        client.image_pub.publish(message)
        counted("frames rejected", count)

    header = next_header(client.node)
    header.stamp.sec -= 10 * int(MAX_FRAME_AGE_S)  # stale
    client.image_pub.publish(make_image(rgb, "rgb8", header))
    counted("frames dropped (stale)", 1)

    status = client.wait_for_status(STATUS, lambda values: values["frames received"] == "6")
    values = status_values(status)
    assert KEYS <= set(values)
    assert values["frames processed"] == "3"
    assert values["frames rejected"] == "2"
    assert values["frames dropped (stale)"] == "1"
    assert values["frames dropped (overwritten)"] == "0"
    assert values["frames failed"] == "0"
    assert values["frames dropped (paused)"] == "0"
    assert values["frames in progress"] == "0"  # received = the outcomes above
    assert values["frames with unusable stamp"] == "0"
    assert values["parameter change"] == "none"
    assert values["batched frames"] == "0"  # one camera: nothing to batch with
    assert values["vocabulary size"] == "3"
    assert values["device"] == status.hardware_id == "cpu"
    assert values["GPU memory allocated (MiB)"] == "n/a"
    assert values["enabled"] == "true"
    assert float(values["rate (frames/s)"]) >= 0.0
    # Rejected frames within the window make the status a warning that says so.
    assert status.level == bytes([1]) and "2 frames rejected" in status.message
    latencies = [
        status_values(s)["latency max (ms)"]
        for s in client.statuses(STATUS)
        if status_values(s)["frames processed"] == "3"
    ]
    assert any(latency != "n/a" and float(latency) > 0.0 for latency in latencies)


def test_diagnostics_say_when_inference_is_paused(client, rgb):
    try:
        assert client.enable(False).success
        status = client.wait_for_status(STATUS, lambda values: values["enabled"] == "false")
        assert status.message.startswith("inference paused (~/enable)")
    finally:
        assert client.enable(True).success
    client.wait_for_status(STATUS, lambda values: values["enabled"] == "true")


def publisher_qos(client, topic: str):
    (info,) = client.spin_until(
        lambda: client.node.get_publishers_info_by_topic(topic), message=f"publisher of {topic}"
    )
    return info.qos_profile


def test_output_qos_follows_the_overrides(client, rgb):
    labels = publisher_qos(client, "/ovss/labels")
    assert labels.reliability == ReliabilityPolicy.BEST_EFFORT
    # The mask topics follow ~/labels.
    mask = publisher_qos(client, "/ovss/masks/cat")
    assert mask.reliability == ReliabilityPolicy.BEST_EFFORT
    label_info = publisher_qos(client, "/ovss/label_info")
    assert label_info.durability == DurabilityPolicy.TRANSIENT_LOCAL
    confidence = publisher_qos(client, "/ovss/confidence")
    assert confidence.durability == DurabilityPolicy.TRANSIENT_LOCAL
    # Not overridden: the defaults.
    overlay = publisher_qos(client, "/ovss/overlay")
    assert overlay.reliability == ReliabilityPolicy.RELIABLE
    assert overlay.durability == DurabilityPolicy.VOLATILE
    # History and depth stay local to the writer (discovery does not carry them): the
    # node's parameters show what it applied.
    for name, value in OUTPUT_OVERRIDES.items():
        assert str(client.get_parameter(name)) == value, name
    assert client.get_parameter("qos_overrides./ovss/overlay.publisher.depth") == 5
    # A best-effort reader gets the labels (and the mask it subscribed to).
    message = make_image(rgb, "rgb8", next_header(client.node))
    client.wait_for_output(message, ("labels", "masks/cat"))
