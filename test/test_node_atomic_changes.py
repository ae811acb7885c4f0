"""What validation accepts, the worker applies: vocabulary and settings in one step (issue 18,
item 4), over real DDS with the node in its own process (tiny CLIP, tiny random BLIP whose text
encoder has 64 positions).

Before the fix the worker applied the settings first, then the vocabulary, so an atomic
request whose end state was valid failed on the state in between and was put back:

- 1000 classes x 2 synonyms in force, one request with 1000 new names and 1000 background
  words (2000 queries, the limit): ``too many text queries: 3000``;
- naclip with 40 classes in force, ``method: pnp_ovss`` with 3 classes: ``the prompt with all
  40 classes has 125 tokens, more than the VLM's 64``.

And while pnp_ovss runs, classes whose prompt does not fit the loaded VLM were accepted, then
put back; now they are refused up front with the reason (the docs promise it).
"""

from __future__ import annotations

import numpy as np
import pytest
from rcl_interfaces.srv import SetParametersAtomically
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    call_service,
    image_array,
    make_image,
    next_header,
    running_node,
    status_values,
)
from tiny_blip import IMAGE_SIZE, save_tiny_blip

STATUS = "ovss: image"
CLASSES = ["person", "dog", "tv"]
# Two word pieces each (words the tiny BLIP vocabulary lacks are one [UNK] each): 40 classes
# make a prompt of 5 + 80 tokens, more than the VLM's 64 positions.
LONG_PROMPT = [f"zq{index} zw{index}" for index in range(40)]
TIMEOUT_S = 120.0  # 2000 texts encoded, 1000 mask topics made

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    blip = save_tiny_blip(tmp_path_factory.mktemp("atomic"))
    parameters = TINY_NODE_PARAMETERS | {
        "classes": CLASSES,
        "pnp.vlm_pretrained": str(blip),
        "pnp.image_size": IMAGE_SIZE,
        "pnp.layer": 2,
        "pnp.head": 3,
        "pnp.dropout_rounds": 1,
        "pnp.refine": "none",
    }
    with running_node(parameters) as (client, process):
        yield client, process


def set_atomically(client, **values):
    service = getattr(client, "_atomic_client", None)
    if service is None:
        service = client._atomic_client = client.node.create_client(
            SetParametersAtomically, "/ovss/set_parameters_atomically"
        )
    request = SetParametersAtomically.Request(
        parameters=[Parameter(name, value=v).to_parameter_msg() for name, v in values.items()]
    )
    return call_service(client.node, service, request).result


def change(client, **values) -> str:
    """Send ``values`` in one atomic request (it must be accepted); wait until label_info tells
    the classes in force after it; return the diagnostics' ``parameter change`` then."""
    topic = client.topic("label_info")
    seen = len(client.messages[topic])
    result = set_atomically(client, **values)
    assert result.successful, result.reason
    wanted = [entry.split(";")[0].strip() for entry in values.get("classes", [])]
    client.spin_until(
        lambda: any(
            [entry.class_name for entry in info.class_map] == wanted
            for info in client.messages[topic][seen:]
        ),
        TIMEOUT_S,
        message=lambda: (
            f"label_info with the {len(wanted)} classes; {client.statuses(STATUS)[-1:]}"
        ),
    )
    status = client.wait_for_status(STATUS, lambda values: True)
    return status_values(status)["parameter change"]


def segment(client, rgb) -> np.ndarray:
    message = make_image(rgb, "rgb8", next_header(client.node))
    return image_array(client.wait_for_output(message, ("labels",))["labels"])


def test_new_names_and_background_words_in_one_request_are_applied(client, node, voc_rgb):
    _, process = node
    doubled = [f"thing {i:04d}; object {i:04d}" for i in range(1000)]
    assert change(client, classes=doubled) == "applied"
    names = [f"item {i:04d}" for i in range(1000)]
    words = [f"backdrop {i:04d}" for i in range(1000)]
    assert change(client, classes=names, background_words=words) == "applied"
    assert client.get_parameter("background_words") == words
    assert segment(client, voc_rgb[0][:48, :64].copy()).dtype == np.uint16  # > 254 classes
    assert "too many text queries" not in process.output()
    assert change(client, classes=CLASSES, background_words=[]) == "applied"


def test_a_method_and_the_classes_it_gets_in_one_request_are_applied(client, node, voc_rgb):
    _, process = node
    assert change(client, classes=LONG_PROMPT) == "applied"
    assert change(client, method="pnp_ovss", classes=CLASSES) == "applied"
    assert client.get_parameter("method") == "pnp_ovss"
    assert segment(client, voc_rgb[0][:48, :64].copy()).shape == (48, 64)
    assert "method pnp_ovss with blip_itm" in process.output()
    assert "tokens, more than the VLM's" not in process.output()


def test_classes_whose_prompt_does_not_fit_the_loaded_vlm_are_refused_up_front(client, node):
    """While pnp_ovss runs (the previous test switched to it): refused with the count, the
    vocabulary in force stays, nothing is put back."""
    _, process = node
    assert client.get_parameter("method") == "pnp_ovss"
    for classes, reason in (
        (LONG_PROMPT[:30], "the prompt with all 30 classes has 65 tokens, more than the VLM's 64"),
        (
            [f"word{index}" for index in range(70)],
            "the prompt with all 70 classes has at least 75 tokens, more than the VLM's 64",
        ),
    ):
        result = client.set_parameters([Parameter("classes", value=classes)])[0]
        assert not result.successful
        assert reason in result.reason
        assert client.get_parameter("classes") == CLASSES
    assert "put back" not in process.output()
    # The same names with another method in the same request are fine: it is the end state
    # that is checked (and back to naclip).
    assert change(client, method="naclip", classes=LONG_PROMPT) == "applied"
