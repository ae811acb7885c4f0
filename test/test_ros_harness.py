"""The test harness's readiness over real DDS: both sides of the input matched, and a writer the
node never matched replaced (``OvssClient.ready``, ``renew_input``)."""

from __future__ import annotations

import numpy as np
import pytest
import ros_harness
from ros_harness import (
    TINY_NODE_PARAMETERS,
    DiscoveryRenewed,
    make_image,
    next_header,
    running_node,
    status_values,
)

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node():
    with running_node(TINY_NODE_PARAMETERS | {"classes": ["cat", "dog"]}) as (client, process):
        yield client, process


def frame(client) -> object:
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return make_image(rgb, "rgb8", next_header(client.node))


def test_matched_means_the_node_counts_the_writer(client):
    topic = client.image_pub.topic_name
    client.spin_until(lambda: client.node_input_publishers(topic) is not None)  # diagnostics
    assert client.inputs_matched()
    assert client.node_input_publishers(topic) == 1
    assert client.node_input_publishers("/no/such/image") is None


def test_a_writer_the_node_does_not_count_is_replaced_once_the_limit_passes(client, monkeypatch):
    topic = client.image_pub.topic_name
    old = client.image_pub
    monkeypatch.setattr(ros_harness, "ONE_SIDED_RENEW_S", 0.0)
    monkeypatch.setattr(client, "node_input_publishers", lambda name: 0)
    with pytest.warns(DiscoveryRenewed, match=topic):
        assert not client.inputs_matched()  # first seen one-sided: the clock starts
        client.spin_until(lambda: client.image_pub is not old)
    assert client.image_pub.topic_name == topic
    assert client.image_pub.qos_profile == old.qos_profile
    monkeypatch.undo()
    # The new writer is matched by the node, which counts exactly one (the old one is gone), and
    # frames sent through it are segmented.
    client.wait_for_status("ovss: image", lambda values: values.get("input publishers") == "1")
    assert client.inputs_matched()
    message = frame(client)
    outputs = client.wait_for_output(message)
    assert outputs["labels"].header == message.header


def test_unknown_to_the_node_is_not_ready_and_not_replaced_before_the_limit(client, monkeypatch):
    old = client.image_pub
    monkeypatch.setattr(client, "node_input_publishers", lambda name: None)
    assert not client.inputs_matched()
    monkeypatch.setattr(client, "node_input_publishers", lambda name: 0)
    assert not client.inputs_matched()  # one-sided, but for less than ONE_SIDED_RENEW_S
    assert client.image_pub is old
    monkeypatch.undo()
    client.spin_until(client.inputs_matched)
    assert client.image_pub is old


def test_the_diagnostics_name_the_input_topic_and_its_publishers(client):
    status = client.wait_for_status("ovss: image", lambda values: "input topic" in values)
    values = status_values(status)
    assert values["input topic"] == client.image_pub.topic_name
    assert int(values["input publishers"]) == client.image_pub.get_subscription_count() == 1
