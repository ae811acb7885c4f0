"""The node reading ``image/compressed`` (image_transport: compressed), pushed into a namespace.

The namespace checks that every name is relative (``-r __ns:=/front`` moves inputs and outputs),
and the input's QoS is overridden to RELIABLE through the standard ``qos_overrides`` parameters.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from rclpy.qos import ReliabilityPolicy
from ros_harness import (
    TINY_NODE_PARAMETERS,
    VOC_IMAGES,
    image_array,
    make_compressed,
    next_header,
    running_node,
    stamp_key,
)

CLASSES = ["sofa", "plant; potted plant"]


pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node():
    parameters = TINY_NODE_PARAMETERS | {"classes": CLASSES, "image_transport": "compressed"}
    with running_node(
        parameters,
        extra_ros_args=[
            "-r",
            "__ns:=/front",
            "-p",
            "qos_overrides./front/image/compressed.subscription.reliability:=reliable",
        ],
        node_namespace="/front/ovss",
        input_namespace="/front",
        compressed=True,
        reliable_input=True,
    ) as (client, process):
        yield client, process


@pytest.fixture(scope="module")
def voc_bgr() -> list[np.ndarray]:
    paths = sorted(VOC_IMAGES.glob("*.jpg"))
    assert paths, f"no VOC samples under {VOC_IMAGES} (Debian package labelme-examples)"
    return [cv2.imread(str(path)) for path in paths]


def encode(bgr: np.ndarray, extension: str) -> bytes:
    ok, data = cv2.imencode(extension, bgr)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(
    ("index", "extension", "image_format"),
    [(0, ".jpg", "rgb8; jpeg compressed bgr8"), (1, ".png", "png"), (2, ".jpg", "jpeg")],
)
def test_compressed_frames_give_outputs_with_their_header_and_size(
    client, voc_bgr, index, extension, image_format
):
    bgr = voc_bgr[index]
    message = make_compressed(encode(bgr, extension), next_header(client.node), image_format)
    out = client.wait_for_output(message, ("labels", "label_info", "overlay", "confidence"))
    for topic, output in out.items():
        assert stamp_key(output.header) == stamp_key(message.header), topic
        if topic != "label_info":
            assert (output.height, output.width) == bgr.shape[:2], topic
    assert [entry.class_name for entry in out["label_info"].class_map] == ["sofa", "plant"]
    labels = image_array(out["labels"])
    assert set(np.unique(labels)) <= {0, 1, 255}
    assert out["overlay"].encoding == "rgb8"


def test_names_are_relative_and_raw_input_is_not_read(client):
    assert client.compressed_pub.topic_name == "/front/image/compressed"
    assert client.compressed_pub.get_subscription_count() == 1
    assert client.image_pub.get_subscription_count() == 0
    assert client.topic("labels") == "/front/ovss/labels"


def test_input_qos_can_be_overridden_by_parameter(client):
    client.spin_until(lambda: client.node.get_subscriptions_info_by_topic("/front/camera_info"))
    (info,) = client.node.get_subscriptions_info_by_topic("/front/image/compressed")
    assert info.node_name == "ovss"
    assert info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    # The override is for that topic only.
    (info,) = client.node.get_subscriptions_info_by_topic("/front/camera_info")
    assert info.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT


def test_undecodable_data_is_skipped_and_the_node_keeps_serving(node, voc_bgr):
    client, process = node
    garbage = make_compressed(b"\xff\xd8 not a jpeg at all", next_header(client.node))
    empty = make_compressed(b"", next_header(client.node))
    truncated = make_compressed(encode(voc_bgr[0], ".jpg")[:200], next_header(client.node))
    broken = [garbage, empty, truncated]
    for message in broken:  # one at a time: a newer frame would replace it unseen
        client.compressed_pub.publish(message)
        client.spin_for(0.2)
    good = make_compressed(encode(voc_bgr[0], ".jpg"), next_header(client.node))
    client.wait_for_output(good, ("labels",))
    client.spin_until(
        lambda: "skipping frame" in process.output(), message="a log line about the bad frame"
    )
    for message in broken:
        assert client.find("labels", message.header) is None
