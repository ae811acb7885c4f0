"""PnP-OVSS's release settings (``pnp.round0``, ``pnp.background``, ``pnp.resize``) over the node.

The node runs pnp_ovss in its own process (tiny CLIP saved to a file here, tiny random BLIP) over
real DDS. A bad value (a word the setting does not take, the wrong type, an empty string) is
refused by the parameter service with the setting's name and its choices, nothing changes, and
the node keeps serving the same labels. A change to the release's values, made while frames
stream, is applied whole: every frame is either the old settings' output or the new ones', the
frames after it are the new ones' (computed here with an engine of the same parameters), and the
parameters read back as set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    image_array,
    make_image,
    next_header,
    running_node,
)
from test_node_methods import set_atomically
from tiny_blip import IMAGE_SIZE, save_tiny_blip

from ovss_ros.core import Segmenter
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.ros import parameters as node_parameters

STATUS = "ovss: image"
CLASSES = ["person", "dog", "tv", "sofa"]
RELEASE = {"pnp.round0": "release", "pnp.background": "fewer_than_3", "pnp.resize": "pil"}

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def parameters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pnp_release")
    torch.manual_seed(0)
    clip = load_clip(str(TINY_VIT), "none", "cpu")
    weights = folder / "tiny-vit.pt"
    torch.save(clip.model.state_dict(), weights)
    return TINY_NODE_PARAMETERS | {
        "pretrained": str(weights),
        "classes": CLASSES,
        "method": "pnp_ovss",
        "pnp.vlm_pretrained": str(save_tiny_blip(folder)),
        "pnp.image_size": IMAGE_SIZE,
        "pnp.layer": 2,
        "pnp.head": 3,
        "pnp.dropout_rounds": 2,
        "pnp.dropout_patches": 2,
        "pnp.presence": "all",  # 4 classes in the prompt: fewer_than_3 drops the background
        "pnp.refine": "none",
    }


@pytest.fixture(scope="module")
def node(parameters):
    with running_node(parameters) as (client, process):
        yield client, process


@pytest.fixture(scope="module")
def rgb(voc_rgb) -> np.ndarray:
    return np.ascontiguousarray(voc_rgb[0][:96, :128])


@pytest.fixture(scope="module")
def expected(parameters, rgb):
    """Labels for ``rgb`` with the node's settings ("ours") and with the release's."""
    values = node_parameters.defaults() | parameters | {"device": "cpu"}
    segmenter = Segmenter(node_parameters.validate(values).engine)
    segmenter.set_classes(CLASSES)
    ours = segmenter.segment(rgb).labels
    segmenter.reconfigure(RELEASE)
    release = segmenter.segment(rgb).labels
    assert np.mean(ours == release) < 0.99  # the settings change the output
    return {"ours": ours, "release": release}


def labels_of(client, rgb) -> np.ndarray:
    message = make_image(rgb, "rgb8", next_header(client.node))
    return image_array(client.wait_for_output(message, ("labels",))["labels"])


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("pnp.round0", "twice", "use one of ['once', 'release']"),
        ("pnp.background", "Fewer_than_3", "['always', 'fewer_than_3']"),
        ("pnp.resize", "", "['antialiased', 'pil']"),
        ("pnp.background", 3, "pnp.background"),
        ("pnp.round0", ["release"], "pnp.round0"),
        ("pnp.threshold", float("nan"), "pnp.threshold"),
        ("pnp.dropout_patches", 0, "pnp.dropout_patches"),
        ("pnp.layer", 9, "pnp.layer 9 > the VLM's 3 text layers"),
    ],
)
def test_a_bad_release_setting_is_refused_and_the_node_keeps_serving(
    client, rgb, expected, name, value, reason
):
    before = client.get_parameter(name)
    results = client.set_parameters([Parameter(name, value=value)])
    assert len(results) == 1 and not results[0].successful
    assert reason in results[0].reason, results[0].reason
    assert "\n" not in results[0].reason
    assert client.get_parameter(name) == before
    assert np.mean(labels_of(client, rgb) == expected["ours"]) > 0.99


def test_release_settings_changed_while_streaming_apply_whole(client, rgb, expected):
    streamed = []
    for _ in range(2):  # frames in flight while the change arrives
        message = make_image(rgb, "rgb8", next_header(client.node))
        client.image_pub.publish(message)
        streamed.append(message.header)
    result = set_atomically(client, [Parameter(k, value=v) for k, v in RELEASE.items()])
    assert result.successful, result.reason
    client.wait_for_status(STATUS, lambda v: v["parameter change"] == "applied")
    after = labels_of(client, rgb)
    assert np.mean(after == expected["release"]) > 0.99
    for header in streamed:  # each earlier frame: old or new settings, never a mix
        message = client.find("labels", header)
        if message is not None:
            labels = image_array(message)
            assert max(np.mean(labels == e) for e in expected.values()) > 0.99
    assert {k: client.get_parameter(k) for k in RELEASE} == RELEASE
    back = {"pnp.round0": "once", "pnp.background": "always", "pnp.resize": "antialiased"}
    assert set_atomically(client, [Parameter(k, value=v) for k, v in back.items()]).successful
    client.wait_for_status(STATUS, lambda v: v["parameter change"] == "applied")
    assert np.mean(labels_of(client, rgb) == expected["ours"]) > 0.99
