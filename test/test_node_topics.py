"""The node over real DDS, in its own process: outputs, vocabulary changes, bad input, pausing.

One node process serves the whole module (start-up costs seconds: torch and open_clip import);
the model is a tiny random CLIP, so the tests check the contract (encodings, sizes, headers,
label values, topics, parameter behaviour), not segmentation quality.
"""

from __future__ import annotations

import importlib
import time

import cv2
import numpy as np
import pytest
from rcl_interfaces.msg import ParameterType
from rclpy.parameter import Parameter
from ros_harness import (
    REPO_ROOT,
    TINY_NODE_PARAMETERS,
    image_array,
    make_image,
    next_header,
    published_topics,
    running_node,
    stamp_key,
)
from sensor_msgs.msg import CameraInfo

from ovss_ros.core import Segmentation, overlay, palette

overlay_module = importlib.import_module("ovss_ros.core.drawing")

CLASSES = ["cat", "dog", "person"]
ALL_OUTPUTS = ("labels", "label_info", "overlay", "confidence")


pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node():
    # The shipped defaults file, with the tiny model and the test vocabulary over it.
    config = ["--params-file", str(REPO_ROOT / "config" / "ovss.yaml")]
    parameters = TINY_NODE_PARAMETERS | {"classes": CLASSES}
    with running_node(parameters, extra_ros_args=config) as (client, process):
        for name in CLASSES:
            client.subscribe_mask(name)
        yield client, process


def class_names(label_info) -> list[str]:
    assert [entry.class_id for entry in label_info.class_map] == list(
        range(len(label_info.class_map))
    )
    return [entry.class_name for entry in label_info.class_map]


def set_ok(client, **values) -> None:
    for name, value in values.items():
        result = client.set_parameters([Parameter(name, value=value)])[0]
        assert result.successful, f"{name}={value!r}: {result.reason}"


def latest_label_info(client):
    messages = client.messages[client.topic("label_info")]
    return messages[-1] if messages else None


def wait_for_vocabulary(client, names: list[str]) -> None:
    client.spin_until(
        lambda: (info := latest_label_info(client)) is not None and class_names(info) == names,
        message=lambda: f"label_info with {names}",
    )


def mask_topics(client) -> set[str]:
    prefix = client.topic("masks/")
    return {name[len(prefix) :] for name in published_topics(client.node, prefix)}


def as_input(rgb: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """(array to send in ``encoding``, the RGB image the node should see)."""
    if encoding == "rgb8":
        return rgb, rgb
    if encoding == "bgr8":
        return np.ascontiguousarray(rgb[..., ::-1]), rgb
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return gray, np.repeat(gray[..., None], 3, axis=2)


@pytest.mark.parametrize(("encoding", "index"), [("rgb8", 0), ("bgr8", 1), ("mono8", 2)])
def test_every_output_matches_the_input_frame(client, voc_rgb, encoding, index):
    array, seen_rgb = as_input(voc_rgb[index], encoding)
    height, width = array.shape[:2]
    message = make_image(array, encoding, next_header(client.node))
    masks = [f"masks/{name}" for name in CLASSES]
    out = client.wait_for_output(message, ALL_OUTPUTS + tuple(masks))

    for topic, output in out.items():
        assert stamp_key(output.header) == stamp_key(message.header), topic
        if topic != "label_info":
            assert (output.height, output.width) == (height, width), topic

    assert class_names(out["label_info"]) == CLASSES
    assert out["label_info"].threshold == pytest.approx(0.0)

    assert out["labels"].encoding == "mono8"
    labels = image_array(out["labels"])
    assert set(np.unique(labels)) <= set(range(len(CLASSES))) | {255}
    assert (labels != 255).all()  # threshold 0 and no background words: every pixel has a class

    assert out["confidence"].encoding == "32FC1"
    confidence = image_array(out["confidence"])
    assert np.isfinite(confidence).all()
    assert confidence.min() >= 1.0 / len(CLASSES) - 1e-4 and confidence.max() <= 1.0 + 1e-6

    for class_index, topic in enumerate(masks):
        assert out[topic].encoding == "mono8"
        mask = image_array(out[topic])
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, labels == class_index)

    # The overlay blends the image as RGB (so bgr8 and mono8 were converted) with class colours
    # (a fresh vocabulary's: the first palette entries) and draws the legend (overlay_legend
    # true in config/ovss.yaml) as ovss-segment and ovss-bag do.
    assert out["overlay"].encoding == "rgb8"
    colours = palette(CLASSES).astype(np.float64)
    blend = 0.5 * seen_rgb + 0.5 * colours[labels]
    drawn = image_array(out["overlay"]).astype(np.float64)
    segmentation = Segmentation(labels, confidence, CLASSES)
    expected = overlay(seen_rgb, segmentation, 0.5).astype(np.float64)
    assert np.abs(drawn - expected).max() <= 1.0
    legend = np.abs(drawn - blend).max(axis=-1) > 1.0
    assert legend.any() and not legend[height // 2 :].any()  # a legend, in the top part


def overlay_of(client, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, overlay) the node publishes for ``rgb``, as arrays."""
    message = make_image(rgb, "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "overlay"))
    return image_array(out["labels"]), image_array(out["overlay"]).astype(np.float64)


def test_overlay_colour_stays_with_its_class_and_the_legend_switches(client, voc_rgb):
    rgb = voc_rgb[0]
    entries = overlay_module.PALETTE.astype(np.float64)
    try:
        # "wall" alone takes palette entry 0; then "door handle" comes first in the vocabulary
        # but wall keeps entry 0 and door handle gets 1 (a fresh vocabulary would swap them).
        set_ok(client, classes=["wall"], overlay_legend=False)
        wait_for_vocabulary(client, ["wall"])
        labels, drawn = overlay_of(client, rgb)
        assert (labels == 0).all()
        assert np.abs(drawn - (0.5 * rgb + 0.5 * entries[0])).max() <= 1.0  # and no legend

        set_ok(client, classes=["door handle", "wall"])
        wait_for_vocabulary(client, ["door handle", "wall"])
        labels, drawn = overlay_of(client, rgb)
        assert set(np.unique(labels)) <= {0, 1}
        colours = entries[[1, 0]]  # door handle, wall
        assert np.abs(drawn - (0.5 * rgb + 0.5 * colours[labels])).max() <= 1.0

        set_ok(client, overlay_legend=True)
        labels, drawn = overlay_of(client, rgb)
        legend = np.abs(drawn - (0.5 * rgb + 0.5 * colours[labels])).max(axis=-1) > 1.0
        assert legend[:40, :40].any() and not legend[rgb.shape[0] // 2 :].any()
    finally:
        set_ok(client, classes=CLASSES, overlay_legend=True)
        wait_for_vocabulary(client, CLASSES)


def test_camera_info_is_passed_through(client):
    info = CameraInfo(header=next_header(client.node), width=500, height=375)
    info.distortion_model = "plumb_bob"
    info.k = [400.0, 0.0, 250.0, 0.0, 400.0, 187.5, 0.0, 0.0, 1.0]
    topic = client.topic("camera_info")
    client.spin_until(lambda: client.camera_info_pub.get_subscription_count() > 0)

    def passed_through():
        client.camera_info_pub.publish(info)
        return client.find(topic, info.header)

    out = client.spin_until(passed_through, message="~/camera_info")
    assert (out.width, out.height, out.distortion_model) == (500, 375, "plumb_bob")
    assert list(out.k) == list(info.k)


def test_vocabulary_change_reaches_label_info_masks_and_labels(client, voc_rgb):
    new = ["tv; television; monitor", "wet floor", "person"]
    names = ["tv", "wet floor", "person"]
    try:
        set_ok(client, classes=new)
        wait_for_vocabulary(client, names)
        client.spin_until(
            lambda: mask_topics(client) == {"tv", "wet_floor", "person"},
            message=lambda: f"mask topics {mask_topics(client)}",
        )
        assert client.get_parameter("classes") == new

        client.subscribe_mask("wet_floor")
        message = make_image(voc_rgb[0], "rgb8", next_header(client.node))
        out = client.wait_for_output(message, ("labels", "label_info", "masks/wet_floor"))
        assert class_names(out["label_info"]) == names
        labels = image_array(out["labels"])
        assert set(np.unique(labels)) <= {0, 1, 2}
        np.testing.assert_array_equal(image_array(out["masks/wet_floor"]) == 255, labels == 1)
    finally:
        client.unsubscribe(client.topic("masks/wet_floor"))
        set_ok(client, classes=CLASSES)
        wait_for_vocabulary(client, CLASSES)
        client.spin_until(lambda: mask_topics(client) == set(CLASSES))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (Parameter("classes", Parameter.Type.STRING_ARRAY, []), "empty"),
        (Parameter("classes", value=["cat", "dog", "cat"]), "duplicate"),
        (Parameter("classes", value=["Cat", "cat"]), "duplicate"),
        (Parameter("classes", value=[1, 2]), "list of strings"),
        (Parameter("classes", value="cat"), "list of strings"),
        (Parameter("classes", value=None), "unset"),
        (Parameter("classes", value=["x" * 201]), "too long"),
        (Parameter("classes", value=[f"class {i}" for i in range(1001)]), "too many"),
        (Parameter("classes", value=["cat", "dog\u202e"]), "u+202e (right-to-left override)"),
        (Parameter("classes", value=["cat", "bell\x07"]), "u+0007 (control character)"),
    ],
    ids=[
        "empty",
        "duplicate",
        "duplicate-case",
        "integers",
        "string",
        "unset",
        "long",
        "many",
        "bidi override",
        "control character",
    ],
)
def test_invalid_vocabulary_is_refused_and_changes_nothing(client, voc_rgb, value, reason):
    result = client.set_parameters([value])[0]
    assert not result.successful
    assert reason in result.reason.lower(), result.reason
    assert client.get_parameter("classes") == CLASSES
    assert client.describe_parameter("classes").type == ParameterType.PARAMETER_STRING_ARRAY
    message = make_image(voc_rgb[0], "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "label_info"))
    assert class_names(out["label_info"]) == CLASSES


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("model", "ViT-L-14", "read-only"),
        ("pretrained", "openai", "read-only"),
        ("device", "cuda", "read-only"),
        ("image_transport", "compressed", "read-only"),
        ("method", "segformer", "method"),
        ("templates", "no placeholder", "templates"),
        ("dense.crop", 100, "patch"),
        ("dense.stride", 32, "dense.crop"),
        ("score_threshold", 2.0, "range"),
        ("background_words", ["sky", ""], "background_words"),
        ("background_words", [1.5], "list of strings"),
        ("background_words", None, "unset"),
    ],
)
def test_invalid_runtime_parameters_are_refused(client, name, value, reason):
    before = client.get_parameter(name)
    result = client.set_parameters([Parameter(name, value=value)])[0]
    assert not result.successful
    assert reason in result.reason, result.reason
    assert client.get_parameter(name) == before


def test_runtime_parameters_apply_to_the_next_frame(client, voc_rgb):
    try:
        set_ok(
            client,
            score_threshold=0.9,
            method="clearclip",
            **{"dense.crop": 32, "dense.stride": 16},
        )
        client.spin_until(
            lambda: (
                (info := latest_label_info(client)) is not None
                and info.threshold == pytest.approx(0.9)
            ),
            message="label_info with the new threshold",
        )
        message = make_image(voc_rgb[1], "rgb8", next_header(client.node))
        out = client.wait_for_output(message, ("labels", "confidence", "label_info"))
        assert out["label_info"].threshold == pytest.approx(0.9)
        labels, confidence = image_array(out["labels"]), image_array(out["confidence"])
        np.testing.assert_array_equal(labels == 255, confidence < 0.9)
    finally:
        set_ok(
            client, score_threshold=0.0, method="naclip", **{"dense.stride": 0, "dense.crop": 0}
        )


@pytest.mark.parametrize(
    "changes",
    [
        {"refinement": "dslo", "dslo.mode": "velocity"},
        {"refinement": "dslo", "dslo.mode": "ot", "dslo.affinity": "keykey"},
        {"refinement": "freecp"},
        {"dense.pamr": True, "dense.upsample": "jbu"},
    ],
    ids=["dslo-velocity", "dslo-ot", "freecp", "pamr-jbu"],
)
def test_refinements_can_be_switched_at_runtime(client, voc_rgb, changes):
    defaults = {name: client.get_parameter(name) for name in changes}
    try:
        set_ok(client, **changes)
        message = make_image(voc_rgb[0], "rgb8", next_header(client.node))
        out = client.wait_for_output(message, ("labels", "label_info"))
        assert (out["labels"].height, out["labels"].width) == voc_rgb[0].shape[:2]
        assert set(np.unique(image_array(out["labels"]))) <= set(range(len(CLASSES))) | {255}
    finally:
        set_ok(client, **defaults)


def test_more_than_254_classes_give_mono16_labels(client, voc_rgb):
    many = [f"thing {i}" for i in range(300)]
    try:
        set_ok(client, publish_masks=False)
        client.spin_until(lambda: not mask_topics(client), message="mask topics removed")
        set_ok(client, classes=many, score_threshold=0.5)
        wait_for_vocabulary(client, many)
        message = make_image(voc_rgb[2], "rgb8", next_header(client.node))
        out = client.wait_for_output(message, ("labels", "label_info"))
        assert out["labels"].encoding == "mono16"
        labels = image_array(out["labels"])
        assert labels.dtype == np.uint16
        assert set(np.unique(labels)) <= set(range(300)) | {65535}
        assert len(out["label_info"].class_map) == 300
    finally:
        set_ok(client, classes=CLASSES, score_threshold=0.0, publish_masks=True)
        client.spin_until(lambda: mask_topics(client) == set(CLASSES))


def test_broken_frames_are_skipped_and_the_node_keeps_serving(node, voc_rgb):
    client, process = node
    rgb = voc_rgb[0]
    good = make_image(rgb, "rgb8", next_header(client.node))
    unknown = make_image(rgb, "yuv_strange", next_header(client.node))
    truncated = make_image(rgb, "rgb8", next_header(client.node))
    truncated.data = truncated.data[: len(truncated.data) // 2]
    empty = make_image(rgb[:0, :0], "rgb8", next_header(client.node))
    short_step = make_image(rgb, "rgb8", next_header(client.node))
    short_step.step = rgb.shape[1]  # fewer bytes per row than the pixels need
    broken = [unknown, truncated, empty, short_step]
    for message in broken:  # one at a time: a newer frame would replace it unseen
        client.publish_until_counted(message, "frames rejected")
    client.wait_for_output(good, ("labels",))
    client.spin_until(
        lambda: "skipping frame" in process.output() and "yuv_strange" in process.output(),
        message="a log line about the bad frame",
    )
    for message in broken:
        assert client.find("labels", message.header) is None


def test_enable_false_pauses_and_true_resumes(client, voc_rgb):
    paused = make_image(voc_rgb[0], "rgb8", next_header(client.node))
    try:
        assert client.enable(False).success
        for _ in range(10):  # a frame takes well under a second on this model
            client.image_pub.publish(paused)
            client.spin_for(0.15)
        assert client.find("labels", paused.header) is None
        assert client.find("label_info", paused.header) is None
    finally:
        assert client.enable(True).success
    resumed = make_image(voc_rgb[0], "rgb8", next_header(client.node))
    client.wait_for_output(resumed, ("labels",))


def test_stale_frames_are_dropped(client, voc_rgb):
    try:
        # A limit a loaded machine keeps for a fresh frame (it may wait for the change to be in
        # force, and is resent with its stamp), far below the stale frame's age.
        set_ok(client, max_frame_age=30.0)
        header = next_header(client.node)
        header.stamp.sec -= 300
        stale = make_image(voc_rgb[0], "rgb8", header)
        for _ in range(10):  # a frame takes well under a second on this model
            client.image_pub.publish(stale)
            client.spin_for(0.1)
        fresh = make_image(voc_rgb[0], "rgb8", next_header(client.node))
        client.wait_for_output(fresh, ("labels",))
        assert client.find("labels", stale.header) is None
    finally:
        set_ok(client, max_frame_age=0.0)


def test_parameter_service_answers_while_the_worker_encodes_text(client):
    """Accepting a vocabulary only queues it: the text encoding runs in the worker thread."""
    many = [f"object number {i}" for i in range(40)]  # x 80 templates: seconds of text encoding
    try:
        set_ok(client, templates="imagenet")
        start = time.monotonic()
        set_ok(client, classes=many)
        assert client.get_parameter("classes") == many
        answered = time.monotonic() - start
        info = latest_label_info(client)
        assert info is None or class_names(info) != [*many], "encoding finished already?"
        assert answered < 1.0
        wait_for_vocabulary(client, many)
    finally:
        set_ok(client, templates="single", classes=CLASSES)
        wait_for_vocabulary(client, CLASSES)
