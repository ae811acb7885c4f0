"""The test harness's readiness over real DDS: both sides of an input matched, and a writer that
the node's diagnostics do not count replaced (``OvssClient.inputs_matched``, ``renew_input``).

The node's side is what its /diagnostics say; where a test needs the node to say something it
does not (0 publishers, a stale count), the statuses are built by hand and put among the
received ones, or the reading is patched; the writers, readers and the node are real.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import ros_harness
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.qos import qos_profile_sensor_data
from ros_harness import (
    MAX_RENEWALS,
    TINY_NODE_PARAMETERS,
    DiscoveryRenewed,
    OvssClient,
    make_image,
    next_header,
    running_node,
    status_values,
)
from sensor_msgs.msg import CompressedImage, Image

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node():
    with running_node(TINY_NODE_PARAMETERS | {"classes": ["cat", "dog"]}) as (client, process):
        yield client, process


@pytest.fixture
def probe():
    """A second client with two cameras and no node: its inputs are read by readers of the
    test's own (``probe.readers``), so that the test decides when a writer is matched."""
    cameras = ["front", "rear"]
    client = OvssClient("/harness_probe/ovss", "/harness_probe", "probe", cameras=cameras)
    client.readers = []
    yield client
    for reader in client.readers:
        client.node.destroy_subscription(reader)
    client.destroy()


def read(probe: OvssClient, topic: str) -> None:
    """A reader of ``topic`` on the probe's node; wait until the probe's writer counts it."""
    probe.readers.append(
        probe.node.create_subscription(Image, topic, lambda _: None, qos_profile_sensor_data)
    )
    writer = next(pub for pub in probe.image_pubs.values() if pub.topic_name == topic)
    probe.spin_until(lambda: writer.get_subscription_count() > 0, message=f"{topic} matched")


def node_says(client: OvssClient, topic: str, publishers: int | None) -> None:
    """A diagnostics array, as a node would send it, counting ``publishers`` on ``topic`` (None:
    the node's status for that camera while it is unsubscribed, without the input values)."""
    values = [KeyValue(key="frames received", value="0")]
    if publishers is not None:
        values.append(KeyValue(key="input topic", value=topic))
        values.append(KeyValue(key="input publishers", value=str(publishers)))
    status = DiagnosticStatus(name=f"ovss: {topic.split('/')[-2]}", values=values)
    client.record_diagnostics(DiagnosticArray(status=[status]))


def frame(client) -> object:
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return make_image(rgb, "rgb8", next_header(client.node))


def test_matched_means_the_node_counts_the_writer(client):
    topic = client.image_pub.topic_name
    client.spin_until(client.inputs_matched)  # diagnostics sent since the call began
    assert client.node_input_publishers(topic) == 1
    assert client.node_input_publishers("/no/such/image") is None


def test_the_diagnostics_name_the_input_topic_and_its_publishers(client):
    status = client.wait_for_status("ovss: image", lambda values: "input topic" in values)
    values = status_values(status)
    assert values["input topic"] == client.image_pub.topic_name
    assert int(values["input publishers"]) == client.image_pub.get_subscription_count() == 1


def test_a_writer_the_node_does_not_count_is_replaced_and_the_node_takes_the_new_one(
    client, monkeypatch
):
    topic = client.image_pub.topic_name
    old, qos = client.image_pub, client.image_pub.qos_profile
    monkeypatch.setattr(ros_harness, "ONE_SIDED_RENEW_S", 0.0)
    monkeypatch.setattr(client, "node_input_publishers", lambda name, since=0: 0)
    with pytest.warns(DiscoveryRenewed, match=topic):
        client.spin_until(lambda: not client.inputs_matched() and client.image_pub is not old)
    assert client.image_pub.topic_name == topic
    assert client.image_pub.qos_profile == qos
    monkeypatch.undo()
    # The node matches the new writer (both sides, from diagnostics sent after the match), and
    # frames sent through it are segmented.
    client.spin_until(client.inputs_matched)
    message = frame(client)
    assert client.wait_for_output(message)["labels"].header == message.header
    client.wait_for_status("ovss: image", lambda values: values["input publishers"] == "1")


def test_no_diagnostics_is_not_matched_and_never_renewed(client, monkeypatch):
    old = client.image_pub
    monkeypatch.setattr(ros_harness, "ONE_SIDED_RENEW_S", 0.0)
    monkeypatch.setattr(client, "node_input_publishers", lambda name, since=0: None)
    for _ in range(3):
        assert not client.inputs_matched()
    assert client.image_pub is old


def test_not_renewed_before_the_limit(client, monkeypatch):
    old = client.image_pub
    monkeypatch.setattr(client, "node_input_publishers", lambda name, since=0: 0)
    for _ in range(3):
        assert not client.inputs_matched()  # one-sided, for less than ONE_SIDED_RENEW_S
    assert client.image_pub is old
    monkeypatch.undo()
    client.spin_until(client.inputs_matched)
    assert client.image_pub is old


def test_a_writer_without_a_reader_is_not_matched_whatever_the_node_says(probe, monkeypatch):
    monkeypatch.setattr(probe, "node_input_publishers", lambda name, since=0: 1)
    assert probe.image_pubs["front"].get_subscription_count() == 0
    assert not probe.inputs_matched()


def test_only_diagnostics_received_since_the_match_count_and_the_newest_wins(probe):
    front, rear = (probe.image_pubs[camera].topic_name for camera in ("front", "rear"))
    node_says(probe, front, 1)  # before the writer matched: stale
    node_says(probe, rear, 1)
    read(probe, front)
    read(probe, rear)
    assert not probe.inputs_matched()  # the clocks start; the "1"s came before the match
    node_says(probe, front, 1)
    node_says(probe, rear, 1)
    node_says(probe, rear, 0)  # the newest for rear
    assert not probe.inputs_matched()
    assert probe.node_input_publishers(rear) == 0
    node_says(probe, rear, 2)
    assert probe.inputs_matched()


def unmatch(probe: OvssClient, topic: str) -> None:
    """Destroy the test's newest reader (of ``topic``); wait until its writer counts none."""
    probe.node.destroy_subscription(probe.readers.pop())
    writer = next(pub for pub in probe.image_pubs.values() if pub.topic_name == topic)
    probe.spin_until(lambda: writer.get_subscription_count() == 0, message=f"{topic} unmatched")


def test_a_new_match_is_not_taken_for_the_old_one(probe):
    """Unmatched and matched again (a lifecycle node deactivated and activated): the statuses of
    the first match say nothing about the second."""
    rear, front = (probe.image_pubs[camera].topic_name for camera in ("rear", "front"))
    read(probe, rear)
    read(probe, front)
    assert not probe.inputs_matched()
    node_says(probe, rear, 1)
    node_says(probe, front, 1)
    assert probe.inputs_matched()
    # No call while unmatched; the node said it was unsubscribed meanwhile.
    unmatch(probe, front)
    node_says(probe, front, None)
    read(probe, front)
    assert not probe.inputs_matched()  # the "1" is older than the unsubscribed status
    node_says(probe, front, 1)
    assert probe.inputs_matched()
    # A call while unmatched; no status in between: the watch restarts at the new match.
    unmatch(probe, front)
    assert not probe.inputs_matched()
    read(probe, front)
    assert not probe.inputs_matched()
    node_says(probe, front, 1)
    assert probe.inputs_matched()


def test_forgotten_diagnostics_do_not_hide_new_ones(probe):
    front, rear = (probe.image_pubs[camera].topic_name for camera in ("front", "rear"))
    read(probe, front)
    read(probe, rear)
    for _ in range(5):
        node_says(probe, front, 0)
    assert not probe.inputs_matched()
    probe.messages["/diagnostics"].clear()  # as some tests do, not through clear()
    node_says(probe, front, 1)
    node_says(probe, rear, 1)
    assert probe.inputs_matched()


def test_the_compressed_input_is_matched_on_its_own(probe):
    topic = probe.compressed_pub.topic_name
    read_compressed = probe.node.create_subscription(
        CompressedImage, topic, lambda _: None, qos_profile_sensor_data
    )
    probe.readers.append(read_compressed)
    probe.spin_until(lambda: probe.compressed_pub.get_subscription_count() > 0)
    assert not probe.inputs_matched(compressed=True)
    node_says(probe, topic, 1)
    assert probe.inputs_matched(compressed=True)
    assert not probe.inputs_matched()  # the image writers have no reader


def test_the_clock_starts_at_the_first_zero_not_at_the_match(probe, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(ros_harness, "_now", lambda: now[0])
    monkeypatch.setattr(ros_harness, "ONE_SIDED_RENEW_S", 10.0)
    front = probe.image_pubs["front"]
    topic = front.topic_name
    read(probe, topic)
    read(probe, probe.image_pubs["rear"].topic_name)
    assert not probe.inputs_matched()  # matched at 100 s; no status yet
    now[0] = 115.0
    node_says(probe, topic, 0)
    assert not probe.inputs_matched()  # the first 0, at 115 s: no renewal
    assert probe.image_pubs["front"] is front
    now[0] = 125.5
    with pytest.warns(DiscoveryRenewed, match=r"for 10\.5 s"):
        assert not probe.inputs_matched()
    # The new writer starts a watch of its own: its first 0 starts the clock again.
    probe.spin_until(lambda: probe.image_pubs["front"].get_subscription_count() > 0)
    assert not probe.inputs_matched()
    node_says(probe, topic, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscoveryRenewed)
        assert not probe.inputs_matched()
        now[0] = 135.0
        assert not probe.inputs_matched()


def test_the_one_sided_clock_restarts_when_the_node_counts_the_writer(probe, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(ros_harness, "_now", lambda: now[0])
    monkeypatch.setattr(ros_harness, "ONE_SIDED_RENEW_S", 10.0)
    read(probe, probe.image_pubs["front"].topic_name)
    read(probe, probe.image_pubs["rear"].topic_name)
    front, rear = probe.image_pubs["front"], probe.image_pubs["rear"]
    front_topic = front.topic_name
    assert not probe.inputs_matched()  # both writers matched: from here diagnostics count
    node_says(probe, rear.topic_name, 1)
    node_says(probe, front.topic_name, 0)
    assert not probe.inputs_matched()  # one-sided since 100 s
    now[0] = 105.0
    node_says(probe, front.topic_name, 1)
    assert probe.inputs_matched()  # matched: the clock stops
    now[0] = 111.0
    node_says(probe, front.topic_name, 0)
    assert not probe.inputs_matched()  # one-sided again since 111 s, not since 100 s
    assert probe.image_pubs["front"] is front
    now[0] = 121.5
    with pytest.warns(DiscoveryRenewed, match=r"for 10\.5 s"):
        assert not probe.inputs_matched()
    assert probe.image_pubs["front"] is not front  # only that camera's writer was replaced
    assert probe.image_pubs["rear"] is rear
    assert probe.image_pubs["front"].topic_name == front_topic


def test_a_topic_is_renewed_at_most_max_renewals_times(probe, monkeypatch):
    monkeypatch.setattr(ros_harness, "ONE_SIDED_RENEW_S", 0.0)
    monkeypatch.setattr(probe, "node_input_publishers", lambda name, since=0: 0)
    topic = probe.image_pubs["front"].topic_name
    read(probe, topic)
    read(probe, probe.image_pubs["rear"].topic_name)
    with pytest.warns(DiscoveryRenewed) as renewals:
        for _ in range(4 * MAX_RENEWALS):
            probe.spin_until(lambda: probe.image_pubs["front"].get_subscription_count() > 0)
            probe.inputs_matched()  # the clock starts (and, with a limit of 0, runs out)
    last = probe.image_pubs["front"]
    for _ in range(3):
        assert not probe.inputs_matched()
    assert probe.image_pubs["front"] is last
    front = [warning for warning in renewals if topic in str(warning.message)]
    assert len(front) == MAX_RENEWALS
    assert f"{topic}: 1 subscription(s)" in probe.describe()
    assert f"writer replaced {MAX_RENEWALS} time(s)" in probe.describe()


def test_the_compressed_writer_is_renewed_on_its_own(probe):
    compressed, image = probe.compressed_pub, probe.image_pubs["front"]
    topic, qos = compressed.topic_name, compressed.qos_profile
    with pytest.warns(DiscoveryRenewed, match="compressed"):
        probe.renew_input(topic, 25.0)
    assert probe.compressed_pub is not compressed
    assert probe.compressed_pub.topic_name == topic
    assert probe.compressed_pub.qos_profile == qos
    assert probe.image_pubs["front"] is image
