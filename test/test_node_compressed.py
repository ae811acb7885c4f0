"""The node reading ``image/compressed`` (image_transport: compressed), pushed into a namespace.

The namespace checks that every name is relative (``-r __ns:=/front`` moves inputs and outputs),
and the input's QoS is overridden to RELIABLE through the standard ``qos_overrides`` parameters.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage
from rclpy.qos import ReliabilityPolicy
from ros_harness import (
    TINY_NODE_PARAMETERS,
    VOC_IMAGES,
    image_array,
    make_compressed,
    next_header,
    running_node,
    stamp_key,
    status_values,
)

CLASSES = ["sofa", "plant; potted plant"]
STATUS = "ovss: image"
OUTCOME_KEYS = (
    "frames processed",
    "frames dropped (paused)",
    "frames dropped (stale)",
    "frames dropped (overwritten)",
    "frames rejected",
    "frames failed",
)


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
        client.publish_until_counted(message, "frames rejected")
    good = make_compressed(encode(voc_bgr[0], ".jpg"), next_header(client.node))
    client.wait_for_output(good, ("labels",))
    client.spin_until(
        lambda: "skipping frame" in process.output(), message="a log line about the bad frame"
    )
    for message in broken:
        assert client.find("labels", message.header) is None


def png_1bit(width: int, height: int) -> bytes:
    """A real 1-bit PNG of zero pixels, written by Pillow (the issue's bomb at 12000x12000)."""
    buffer = io.BytesIO()
    PILImage.new("1", (width, height)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_a_decompression_bomb_is_rejected_from_its_header_and_counted(node, voc_bgr):
    """Issue 7, item 3: 17.6 KB declaring 12000x12000 pixels (78 s and 14.7 GB before)."""
    client, process = node
    bomb = png_1bit(12000, 12000)
    assert len(bomb) < 20_000
    before = client.wait_for_status(STATUS, lambda values: True)
    rejected = int(status_values(before)["frames rejected"])
    message = make_compressed(bomb, next_header(client.node), "png")
    client.compressed_pub.publish(message)
    client.wait_for_status(STATUS, lambda values: int(values["frames rejected"]) == rejected + 1)
    client.spin_until(
        lambda: (
            "declares 12000x12000 = 144000000 pixels, more than max_input_pixels = "
            "40000000" in process.output()
        ),
        message="the reason in the log",
    )
    assert client.find("labels", message.header) is None
    good = make_compressed(encode(voc_bgr[0], ".jpg"), next_header(client.node))
    client.wait_for_output(good, ("labels",))
    status = client.wait_for_status(STATUS, lambda values: values["frames in progress"] == "0")
    values = status_values(status)
    outcomes = sum(int(values[key]) for key in OUTCOME_KEYS)
    assert int(values["frames received"]) == outcomes


def test_exif_orientation_does_not_turn_the_outputs(client, voc_bgr):
    """Outputs have the stored pixel grid's size (as camera_info and image_transport see it),
    whatever the EXIF Orientation tag says (6: rotate 90 degrees to display)."""
    rgb = np.ascontiguousarray(voc_bgr[1][100:148, 200:264, ::-1])
    exif = PILImage.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    message = make_compressed(buffer.getvalue(), next_header(client.node), "jpeg")
    out = client.wait_for_output(message, ("labels", "overlay", "confidence"))
    for topic, output in out.items():
        assert (output.width, output.height) == (64, 48), topic
