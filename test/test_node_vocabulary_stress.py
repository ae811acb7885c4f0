"""Vocabulary changes while frames flow, over real DDS (issue 18, item 1).

The node runs in its own process with the tiny CLIP and one template; a camera thread of this
process sends 30 frames a second (RELIABLE, deep history: every frame reaches the node) while
the vocabulary goes from 6 classes to 1000 and back, 10 rounds, each change waited for. Before
the fix the worker thread created and destroyed the ``~/masks/<slug>`` publishers while the
executor thread built its wait set from them, and the node died within a few rounds
(``InvalidHandle: cannot use Destroyable because destruction was requested``). Now:

- the node is alive after every round, and stops cleanly (status 0) at the end;
- every frame is accounted for: received = sent = processed + dropped + rejected + failed,
  and none failed or was rejected (a vocabulary half in force fails frames: checked with the
  method's text embeddings left out of the commit, every frame failed);
- no frame is published on a mask topic of a class its own label_info does not hold (the mask
  topics follow the vocabulary in force, before the next frame).

The mask step put back on the worker thread (the old bug) shows as InvalidHandle in the node's
output within 2 rounds (1000 publishers made and destroyed per round): 10 rounds keep a margin.
"""

from __future__ import annotations

import pytest
from dds_attack import FrameStream, accounting, reliable_input_overrides, settled_status
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import TINY_NODE_PARAMETERS, running_node, stamp_key
from sensor_msgs.msg import Image
from vision_msgs.msg import LabelInfo

ROUNDS = 10
RATE_HZ = 30.0
SMALL = ["person", "chair", "table", "floor", "wall", "door"]
LARGE = [f"thing {index:04d}" for index in range(1000)]
WATCHED = {"person": "/ovss/masks/person", "thing 0000": "/ovss/masks/thing_0000"}
STATUS = "ovss: image"
CHANGE_TIMEOUT_S = 120.0  # 1000 classes encoded the first time, 1000 topics created


@pytest.fixture(scope="module")
def node():
    parameters = TINY_NODE_PARAMETERS | {"classes": SMALL}
    with running_node(parameters, reliable_input_overrides(), reliable_input=True) as (
        client,
        process,
    ):
        yield client, process


class Record:
    """What the node published, by frame: the classes label_info gave it, and the masks."""

    def __init__(self, client) -> None:
        self.classes: dict[tuple, frozenset[str]] = {}
        self.sizes: list[int] = []  # vocabulary size of every label_info, in arrival order
        self.masks: dict[str, list[tuple]] = {name: [] for name in WATCHED}
        node = client.node
        latched = QoSProfile(
            depth=1000,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        deep = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self._subscriptions = [
            node.create_subscription(LabelInfo, "/ovss/label_info", self._label_info, latched)
        ]
        for name, topic in WATCHED.items():
            self._subscriptions.append(
                node.create_subscription(
                    Image,
                    topic,
                    lambda message, n=name: self.masks[n].append(stamp_key(message.header)),
                    deep,
                )
            )

    def _label_info(self, message: LabelInfo) -> None:
        names = frozenset(entry.class_name for entry in message.class_map)
        self.classes[stamp_key(message.header)] = names
        self.sizes.append(len(names))


def test_vocabulary_changes_while_frames_flow_keep_the_node_alive(node, voc_rgb):
    client, process = node
    record = Record(client)
    rgb = voc_rgb[0][:48, :64]
    with FrameStream(rgb, RATE_HZ) as stream:
        client.spin_until(stream.matched)
        for round_index in range(ROUNDS):
            for vocabulary in (LARGE, SMALL):
                seen, size = len(record.sizes), len(vocabulary)
                result = client.set_parameters([Parameter("classes", value=vocabulary)])[0]
                assert result.successful, result.reason
                client.spin_until(
                    lambda size=size, seen=seen: (
                        process.returncode is not None or size in record.sizes[seen:]
                    ),
                    CHANGE_TIMEOUT_S,
                    message=f"round {round_index}: {len(vocabulary)} classes in force",
                )
                assert process.returncode is None, (
                    f"node died in round {round_index}:\n{process.output()}"
                )
            client.clear()  # the default subscriptions keep whole images
        sent = stream.sent
    values = settled_status(client, STATUS, sent)
    received, outcomes = accounting(values)
    assert received == sent == outcomes, values
    assert int(values["frames processed"]) > 0
    # Every frame was valid: one that failed (or was refused) met a vocabulary half in force.
    assert int(values["frames failed"]) == int(values["frames rejected"]) == 0, values
    checked = 0
    for name, keys in record.masks.items():
        for key in keys:
            if key in record.classes:  # label_info of that frame arrived (depth 1 on the node)
                assert name in record.classes[key], (name, key)
                checked += 1
    assert checked > 0, "no mask frame could be matched with its label_info"
    assert "InvalidHandle" not in process.output()
