"""Two cameras on one node over real DDS: per-camera namespaces, headers, sizes and batching.

One model serves both; the inputs are RELIABLE (overridden on the node), so that every frame sent
arrives and the counters in /diagnostics can be compared with what was sent.
"""

from __future__ import annotations

import numpy as np
import pytest
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    image_array,
    make_image,
    next_header,
    published_topics,
    running_node,
    stamp_key,
    status_values,
)
from sensor_msgs.msg import CameraInfo

CAMERAS = ["front", "rear"]
CLASSES = ["cat", "dog", "person"]
OUTPUTS = ("labels", "label_info", "overlay", "confidence")


pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node():
    extra = []
    for camera in CAMERAS:
        extra += ["-p", f"qos_overrides./{camera}/image.subscription.reliability:=reliable"]
    parameters = TINY_NODE_PARAMETERS | {"classes": CLASSES, "cameras": CAMERAS}
    with running_node(parameters, extra_ros_args=extra, reliable_input=True, cameras=CAMERAS) as (
        client,
        process,
    ):
        yield client, process


def test_each_camera_has_its_own_inputs_and_outputs(client):
    names = published_topics(client.node, "/ovss/")
    for camera in CAMERAS:
        for topic in (*OUTPUTS, "camera_info", "masks/cat", "masks/person"):
            assert f"/ovss/{camera}/{topic}" in names
        assert client.image_pubs[camera].get_subscription_count() == 1
    assert "/ovss/labels" not in names  # no single-camera outputs beside them


def test_outputs_carry_their_own_camera_header_and_size(client, voc_rgb):
    sent = {
        "front": make_image(voc_rgb[0], "rgb8", next_header(client.node, "front")),
        "rear": make_image(voc_rgb[1], "rgb8", next_header(client.node, "rear")),
    }
    assert voc_rgb[0].shape != voc_rgb[1].shape
    for camera, message in sent.items():
        client.image_pubs[camera].publish(message)
    for camera, message in sent.items():
        topics = [f"{camera}/{topic}" for topic in OUTPUTS]
        out = client.wait_for_output(
            message, topics, publisher=client.image_pubs[camera], resend_every=1e9
        )
        for topic, output in out.items():
            assert stamp_key(output.header) == stamp_key(message.header), topic
            if not topic.endswith("label_info"):
                assert (output.height, output.width) == (message.height, message.width), topic
        assert [c.class_name for c in out[f"{camera}/label_info"].class_map] == CLASSES
        labels = image_array(out[f"{camera}/labels"])
        assert set(np.unique(labels)) <= {0, 1, 2}
        other = "rear" if camera == "front" else "front"
        assert client.find(f"{other}/labels", message.header) is None


def test_camera_info_is_passed_through_per_camera(client):
    info = CameraInfo(header=next_header(client.node, "rear"), width=500, height=375)
    client.spin_until(lambda: client.camera_info_pubs["rear"].get_subscription_count() > 0)

    def passed_through():
        client.camera_info_pubs["rear"].publish(info)
        return client.find("rear/camera_info", info.header)

    client.spin_until(passed_through, message="rear/camera_info")
    assert client.find("front/camera_info", info.header) is None


PAIRS = 20  # frame pairs sent until one is batched


def test_frames_ready_together_share_one_forward_pass(client, voc_rgb):
    """A frame from each camera, published together, is taken at once and segmented in one
    batch (sent again, a pair at a time, until a batch is seen: the worker may wake between
    the two); while a new vocabulary encodes beside the frames (about a second of text
    encoding) the frames keep the vocabulary in force, and the new one follows whole."""
    status = {camera: client.wait_for_status(f"ovss: {camera}", bool) for camera in CAMERAS}
    batched_before = {
        camera: int(status_values(s)["batched frames"]) for camera, s in status.items()
    }
    many = [f"object number {i}" for i in range(20)]
    try:
        results = client.set_parameters(
            [Parameter("templates", value="imagenet"), Parameter("classes", value=many)]
        )
        assert all(result.successful for result in results)
        for _ in range(PAIRS):
            sent = {
                camera: make_image(voc_rgb[2], "rgb8", next_header(client.node, camera))
                for camera in CAMERAS
            }
            for camera, message in sent.items():
                client.image_pubs[camera].publish(message)
            for camera, message in sent.items():
                out = client.wait_for_output(
                    message,
                    [f"{camera}/labels", f"{camera}/label_info"],
                    publisher=client.image_pubs[camera],
                    timeout=30,
                )
                assert len(out[f"{camera}/label_info"].class_map) in (3, 20)  # one or other
            values = {
                camera: status_values(client.wait_for_status(f"ovss: {camera}", bool))
                for camera in CAMERAS
            }
            if all(
                int(values[camera]["batched frames"]) > batched_before[camera]
                for camera in CAMERAS
            ):
                break
        for camera in CAMERAS:
            assert int(values[camera]["batched frames"]) > batched_before[camera], values
            assert values[camera]["frames failed"] == "0"
            assert int(values[camera]["frames processed"]) >= 2
            client.wait_for_status(
                f"ovss: {camera}", lambda v: v["vocabulary size"] == "20"
            )
    finally:
        results = client.set_parameters(
            [Parameter("templates", value="single"), Parameter("classes", value=CLASSES)]
        )
        assert all(result.successful for result in results)
