"""The node's worker logic in-process, with a stand-in Segmenter that can fail on demand.

What the DDS tests cannot provoke on purpose: inference raising (a CUDA out-of-memory), a failed
vocabulary change; and the counters kept for diagnostics.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from ros_harness import isolate_dds, make_image
from std_msgs.msg import Header

import ovss_ros.node as node_module
from ovss_ros.core import ClassEntry, EngineConfig, Segmentation, parse_classes
from ovss_ros.node import Frame, OvssNode


class FakeClip:
    patch_size = 16


class FakeSegmenter:
    """Same surface as ovss_ros.core.Segmenter; records calls, fails when told to."""

    fail_segment = False
    fail_set_classes = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = "cpu"
        self.clip = FakeClip()
        self.classes: list[ClassEntry] = []
        self.calls: list[str] = []

    def set_classes(self, entries) -> None:
        self.calls.append("set_classes")
        if FakeSegmenter.fail_set_classes:
            raise RuntimeError("out of memory while encoding text")
        self.classes = parse_classes(entries)

    def reconfigure(self, **changes) -> None:
        self.calls.append(f"reconfigure {sorted(changes)}")
        for name, value in changes.items():
            setattr(self.config, name, value)

    def segment(self, rgb: np.ndarray) -> Segmentation:
        self.calls.append("segment")
        if FakeSegmenter.fail_segment:
            raise RuntimeError("CUDA out of memory")
        height, width = rgb.shape[:2]
        return Segmentation(
            labels=np.zeros((height, width), np.uint8),
            confidence=np.ones((height, width), np.float32),
            class_names=[entry.name for entry in self.classes],
        )


@pytest.fixture
def node(monkeypatch):
    isolate_dds()
    monkeypatch.setattr(node_module, "Segmenter", FakeSegmenter)
    FakeSegmenter.fail_segment = FakeSegmenter.fail_set_classes = False
    context = rclpy.Context()
    rclpy.init(context=context)
    ovss = OvssNode(
        context=context,
        parameter_overrides=[Parameter("classes", value=["cat", "dog"])],
    )
    yield ovss
    ovss.destroy_node()
    rclpy.shutdown(context=context)


def frame(node: OvssNode, age: float = 0.0, stamped: bool = True, encoding: str = "rgb8"):
    header = Header(frame_id="camera")
    if stamped:
        now = node.get_clock().now().nanoseconds - int(age * 1e9)
        header.stamp.sec, header.stamp.nanosec = divmod(now, 10**9)
    message = make_image(np.zeros((8, 12, 3), np.uint8), encoding, header)
    return Frame(message, node.get_clock().now())


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_inference_failure_is_counted_and_the_next_frame_is_served(node):
    FakeSegmenter.fail_segment = True
    node._process(frame(node))
    assert node.counters.failed == 1 and node.counters.processed == 0
    FakeSegmenter.fail_segment = False
    node._process(frame(node))
    assert node.counters.processed == 1
    assert node.counters.last_inference_s >= 0.0


def test_bad_frames_are_counted_as_rejected(node):
    node._process(frame(node, encoding="no_such_encoding"))
    assert node.counters.rejected == 1
    assert "segment" not in node.segmenter.calls


def test_stale_frames_are_dropped_but_unstamped_ones_are_not(node):
    assert node.set_parameters([Parameter("max_frame_age", value=1.0)])[0].successful
    node._process(frame(node, age=5.0))
    assert node.counters.dropped_stale == 1 and node.counters.processed == 0
    node._process(frame(node, age=0.1))
    node._process(frame(node, stamped=False))
    assert node.counters.processed == 2


def test_paused_node_does_not_segment(node):
    node._enabled.clear()
    node._process(frame(node))
    node._on_image(frame(node).message)
    assert node.counters.processed == 0 and node.counters.received == 1
    assert "segment" not in node.segmenter.calls


def test_accepted_parameters_reach_the_segmenter_in_the_worker(node):
    results = node.set_parameters(
        [
            Parameter("classes", value=["tv; television", "sofa"]),
            Parameter("method", value="sclip"),
        ]
    )
    assert all(result.successful for result in results)
    wait_until(lambda: [c.name for c in node.segmenter.classes] == ["tv", "sofa"])
    wait_until(lambda: node.segmenter.config.method == "sclip")
    assert sorted(node._mask_publishers) == ["sofa", "tv"]


def test_refused_parameters_reach_nothing(node):
    calls = len(node.segmenter.calls)
    result = node.set_parameters([Parameter("classes", value=["cat", "cat"])])[0]
    assert not result.successful and "duplicate" in result.reason
    result = node.set_parameters([Parameter("crop", value=24)])[0]
    assert not result.successful and "patch size 16" in result.reason
    node._apply_pending()
    assert len(node.segmenter.calls) == calls
    assert node.get_parameter("classes").value == ["cat", "dog"]


def test_failed_vocabulary_change_keeps_the_node_serving(node):
    FakeSegmenter.fail_set_classes = True
    assert node.set_parameters([Parameter("classes", value=["bird"])])[0].successful
    wait_until(lambda: node.segmenter.calls.count("set_classes") == 2)
    FakeSegmenter.fail_set_classes = False
    assert [c.name for c in node.segmenter.classes] == ["cat", "dog"]
    node._process(frame(node))
    assert node.counters.processed == 1


def test_destroy_node_stops_the_worker(node):
    worker = node._worker
    assert worker.alive
    node.destroy_node()
    assert not worker.alive
