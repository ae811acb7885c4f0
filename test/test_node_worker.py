"""The node's worker logic in-process, with the real Segmenter failing on demand.

What the DDS tests cannot provoke on purpose: inference raising (a CUDA out-of-memory) for one
frame or for a whole multi-camera batch, a failed vocabulary change; and the counters kept for
diagnostics.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from ros_harness import TINY_NODE_PARAMETERS, isolate_dds, make_image
from std_msgs.msg import Header

import ovss_ros.node as node_module
from ovss_ros.core import EngineConfig, Segmentation, Segmenter
from ovss_ros.diagnostics import ERROR, OK, WARN, NodeState, camera_report
from ovss_ros.node import Frame, OvssNode


class FaultySegmenter(Segmenter):
    """The real engine on a tiny random open_clip model, with faults injected on demand (as a
    CUDA out-of-memory would raise), and a record of the calls the node made."""

    fail_segment = False
    fail_set_classes = False
    fail_width: int | None = None  # any batch with a frame this wide raises

    def __init__(self, config: EngineConfig) -> None:
        self.calls: list[str] = []
        super().__init__(config)

    def set_classes(self, entries) -> None:
        self.calls.append("set_classes")
        if FaultySegmenter.fail_set_classes:
            raise RuntimeError("out of memory while encoding text")
        super().set_classes(entries)

    def reconfigure(self, **changes) -> None:
        self.calls.append(f"reconfigure {sorted(changes)}")
        super().reconfigure(**changes)

    def segment_many(self, images: list[np.ndarray]) -> list[Segmentation]:
        self.calls.append(f"segment_many {len(images)}")
        widths = [rgb.shape[1] for rgb in images]
        if FaultySegmenter.fail_segment or FaultySegmenter.fail_width in widths:
            raise RuntimeError("CUDA out of memory")
        return super().segment_many(images)

    def forwards(self) -> list[str]:
        return [call for call in self.calls if call.startswith("segment_many")]


def make_node(monkeypatch, *overrides: Parameter):
    isolate_dds()
    monkeypatch.setattr(node_module, "Segmenter", FaultySegmenter)
    FaultySegmenter.fail_segment = FaultySegmenter.fail_set_classes = False
    FaultySegmenter.fail_width = None
    context = rclpy.Context()
    rclpy.init(context=context)
    ovss = OvssNode(
        context=context,
        parameter_overrides=[
            *(Parameter(name, value=value) for name, value in TINY_NODE_PARAMETERS.items()),
            Parameter("classes", value=["cat", "dog"]),
            *overrides,
        ],
    )
    yield ovss
    ovss.destroy_node()
    rclpy.shutdown(context=context)


@pytest.fixture
def node(monkeypatch):
    yield from make_node(monkeypatch)


@pytest.fixture
def two_cameras(monkeypatch):
    yield from make_node(monkeypatch, Parameter("cameras", value=["front", "rear"]))


def frame(
    node: OvssNode,
    age: float = 0.0,
    stamped: bool = True,
    encoding: str = "rgb8",
    camera: int = 0,
    width: int = 12,
):
    header = Header(frame_id="camera")
    if stamped:
        now = node.get_clock().now().nanoseconds - int(age * 1e9)
        header.stamp.sec, header.stamp.nanosec = divmod(now, 10**9)
    message = make_image(np.zeros((8, width, 3), np.uint8), encoding, header)
    return Frame(node.cameras[camera], message, node.get_clock().now())


def totals(node: OvssNode, camera: int = 0):
    return node.cameras[camera].stats.totals


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_inference_failure_is_counted_and_the_next_frame_is_served(node):
    FaultySegmenter.fail_segment = True
    node._process([frame(node)])
    assert totals(node).failed == 1 and totals(node).processed == 0
    FaultySegmenter.fail_segment = False
    node._process([frame(node)])
    assert totals(node).processed == 1
    (sample,) = node.cameras[0].stats.window().samples
    assert sample.inference_s >= 0.0 and sample.latency_s >= 0.0


def test_bad_frames_are_counted_as_rejected(node):
    node._process([frame(node, encoding="no_such_encoding")])
    assert totals(node).rejected == 1
    assert not node.segmenter.forwards()


def test_stale_frames_are_dropped_but_unstamped_ones_are_not(node):
    assert node.set_parameters([Parameter("max_frame_age", value=1.0)])[0].successful
    node._process([frame(node, age=5.0)])
    assert totals(node).dropped_stale == 1 and totals(node).processed == 0
    node._process([frame(node, age=0.1)])
    node._process([frame(node, stamped=False)])
    assert totals(node).processed == 2


def test_paused_node_does_not_segment(node):
    node._enabled.clear()
    node._process([frame(node)])
    node._on_image(node.cameras[0], frame(node).message)
    assert totals(node).processed == 0 and totals(node).received == 1
    assert not node.segmenter.forwards()


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
    assert sorted(node.cameras[0].outputs.masks) == ["sofa", "tv"]


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
    FaultySegmenter.fail_set_classes = True
    assert node.set_parameters([Parameter("classes", value=["bird"])])[0].successful
    wait_until(lambda: node.segmenter.calls.count("set_classes") == 2)
    FaultySegmenter.fail_set_classes = False
    assert [c.name for c in node.segmenter.classes] == ["cat", "dog"]
    node._process([frame(node)])
    assert totals(node).processed == 1


def test_destroy_node_stops_the_worker(node):
    worker = node._worker
    assert worker.alive
    node.destroy_node()
    assert not worker.alive


def test_frames_of_two_cameras_share_one_forward_and_are_counted_as_batched(two_cameras):
    node = two_cameras
    assert [camera.name for camera in node.cameras] == ["front", "rear"]
    node._process([frame(node, camera=0), frame(node, camera=1)])
    assert node.segmenter.forwards() == ["segment_many 2"]
    for camera in (0, 1):
        assert totals(node, camera).processed == 1 and totals(node, camera).batched == 1
    # Different sizes after resizing: one call, but two forward passes in the engine.
    node._process([frame(node, camera=0), frame(node, camera=1, width=300)])
    assert totals(node, 0).batched == 1 and totals(node, 1).processed == 2


def test_failed_batch_costs_only_the_frames_that_fail_alone(two_cameras):
    node = two_cameras
    FaultySegmenter.fail_width = 13  # the rear camera's frames cannot be segmented
    node._process([frame(node, camera=0), frame(node, camera=1, width=13)])
    assert node.segmenter.forwards() == ["segment_many 2", "segment_many 1", "segment_many 1"]
    assert totals(node, 0).processed == 1 and totals(node, 0).failed == 0
    assert totals(node, 1).processed == 0 and totals(node, 1).failed == 1
    assert totals(node, 0).batched == 0  # it was segmented alone in the end


def test_batch_that_fails_whole_loses_those_frames_and_the_next_batch_is_served(two_cameras):
    node = two_cameras
    FaultySegmenter.fail_segment = True  # e.g. the GPU is out of memory for a while
    node._process([frame(node, camera=0), frame(node, camera=1)])
    assert [totals(node, c).failed for c in (0, 1)] == [1, 1]
    FaultySegmenter.fail_segment = False
    node._process([frame(node, camera=0), frame(node, camera=1)])
    assert [totals(node, c).processed for c in (0, 1)] == [1, 1]
    assert [totals(node, c).failed for c in (0, 1)] == [1, 1]


def test_diagnostics_level_follows_the_failures_in_the_window(two_cameras):
    node = two_cameras
    state = NodeState(device="cpu", vocabulary_size=2, enabled=True)
    FaultySegmenter.fail_width = 13
    node._process([frame(node, camera=0), frame(node, camera=1, width=13)])
    front = camera_report(node.cameras[0].stats.window(), state)
    rear = camera_report(node.cameras[1].stats.window(), state)
    assert front.level == OK and rear.level == ERROR
    assert rear.value("frames failed") == "1" and "every frame" in rear.message
    node._process([frame(node, camera=1)])  # a frame the model takes: only some failed now
    rear = camera_report(node.cameras[1].stats.window(), state)
    assert rear.level == WARN and rear.value("frames processed") == "1"


def test_each_camera_publishes_under_its_own_namespace(two_cameras):
    node = two_cameras
    topics = {camera.name: camera.outputs.labels.topic_name for camera in node.cameras}
    assert topics == {"front": "/ovss/front/labels", "rear": "/ovss/rear/labels"}
    masks = node.cameras[1].outputs.masks
    assert sorted(publisher.topic_name for publisher in masks.values()) == [
        "/ovss/rear/masks/cat",
        "/ovss/rear/masks/dog",
    ]
    inputs = {name for name, _ in node.get_subscriber_names_and_types_by_node("ovss", "/")}
    assert {"/front/image", "/front/camera_info", "/rear/image", "/rear/camera_info"} <= inputs
