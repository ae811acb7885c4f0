"""The node's worker logic in-process, with the real Segmenter failing on demand.

What the DDS tests cannot provoke on purpose: inference raising (a CUDA out-of-memory) for one
frame or for a whole multi-camera batch, a failed vocabulary change, a publisher that cannot be
created; and the counters kept for diagnostics, which must account for every frame.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from ros_harness import TINY_NODE_PARAMETERS, isolate_dds, make_image
from std_msgs.msg import Header
from std_srvs.srv import SetBool

import ovss_ros.core.segmenter as segmenter_module
import ovss_ros.ros.processing as processing
from ovss_ros.core import EngineConfig, Segmentation, Segmenter, Stopped
from ovss_ros.ros import log_text
from ovss_ros.ros.diagnostics import ERROR, OK, OUTCOMES, WARN, NodeState, camera_report
from ovss_ros.ros.node import OvssNode
from ovss_ros.ros.worker import FrameBuffer


class FaultySegmenter(Segmenter):
    """The real engine on a tiny random open_clip model, with faults injected on demand (as a
    CUDA out-of-memory would raise), and a record of the calls the node made."""

    fail_segment = False
    fail_set_classes = False
    fail_width: int | None = None  # any batch with a frame this wide raises
    stopped = False  # the stop event is set: the engine raises Stopped

    def __init__(self, config: EngineConfig, **kwargs) -> None:
        self.calls: list[str] = []
        super().__init__(config, **kwargs)

    def prepare_update(self, classes=None, changes=None, cancel=None, **shared):
        """The call the node makes to prepare a change of the engine (vocabulary and settings
        by dotted name), beside the frames; ``commit`` puts it in force."""
        self.calls.append(f"update {classes is not None} {sorted({**(changes or {}), **shared})}")
        if classes is not None and FaultySegmenter.stopped:
            raise Stopped("stop requested before encoding")
        if classes is not None and FaultySegmenter.fail_set_classes:
            raise RuntimeError("out of memory while encoding text")
        return super().prepare_update(classes, changes, cancel, **shared)

    def segment_many(self, images: list[np.ndarray]) -> list[Segmentation]:
        self.calls.append(f"segment_many {len(images)}")
        widths = [rgb.shape[1] for rgb in images]
        if FaultySegmenter.stopped:
            raise Stopped("stop requested before encode")
        if FaultySegmenter.fail_segment or FaultySegmenter.fail_width in widths:
            raise RuntimeError("CUDA out of memory")
        return super().segment_many(images)

    def forwards(self) -> list[str]:
        return [call for call in self.calls if call.startswith("segment_many")]


def make_node(monkeypatch, *overrides: Parameter):
    isolate_dds()
    monkeypatch.setattr(segmenter_module, "Segmenter", FaultySegmenter)
    FaultySegmenter.fail_segment = FaultySegmenter.fail_set_classes = False
    FaultySegmenter.stopped = False
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


def message(
    node: OvssNode,
    age: float = 0.0,
    stamped: bool = True,
    encoding: str = "rgb8",
    width: int = 12,
    stamp: tuple[int, int] | None = None,
):
    header = Header(frame_id="camera")
    if stamp is not None:
        header.stamp.sec, header.stamp.nanosec = stamp
    elif stamped:
        now = node.get_clock().now().nanoseconds - int(age * 1e9)
        header.stamp.sec, header.stamp.nanosec = divmod(now, 10**9)
    return make_image(np.zeros((8, width, 3), np.uint8), encoding, header)


def frame(node: OvssNode, camera: int = 0, **kwargs):
    """A frame received (counted, held) as the image callback receives one, not yet taken."""
    received, _ = node.frames.admit(
        node.cameras[camera], message(node, **kwargs), node.get_clock().now()
    )
    return received


def totals(node: OvssNode, camera: int = 0):
    return node.cameras[camera].stats.totals


def accounted(node: OvssNode) -> None:
    """Every camera: received = processed + dropped (each reason) + rejected + failed, nothing
    left in progress once the frames handed over are handled."""
    for camera in node.cameras:
        counts = camera.stats.totals
        assert counts.in_progress == 0, counts
        assert counts.received == sum(getattr(counts, name) for name in OUTCOMES), counts


def applied(node: OvssNode, name: str, value) -> bool:
    """The worker has applied a node setting (it takes effect with the engine's changes)."""
    return getattr(node.transactions.applied_settings, name) == value


def test_inference_failure_is_counted_and_the_next_frame_is_served(node):
    FaultySegmenter.fail_segment = True
    node.processor.process([frame(node)])
    assert totals(node).failed == 1 and totals(node).processed == 0
    FaultySegmenter.fail_segment = False
    node.processor.process([frame(node)])
    assert totals(node).processed == 1
    (sample,) = node.cameras[0].stats.window().samples
    assert sample.inference_s >= 0.0 and sample.latency_s >= 0.0
    accounted(node)


def test_bad_frames_are_counted_as_rejected(node):
    node.processor.process([frame(node, encoding="no_such_encoding")])
    assert totals(node).rejected == 1
    assert not node.segmenter.forwards()
    accounted(node)


def test_frames_over_the_pixel_limit_are_rejected_before_conversion(node):
    assert node.set_parameters([Parameter("max_input_pixels", value=95)])[0].successful
    spin_until(node, lambda: applied(node, "max_input_pixels", 95))
    node.processor.process([frame(node, width=12)])  # 8x12 = 96 pixels
    assert totals(node).rejected == 1 and not node.segmenter.forwards()
    node.processor.process([frame(node, width=11)])  # 88
    assert totals(node).processed == 1
    # Declared 100000 x 100000, with 12 bytes of data: refused for its size, nothing allocated.
    huge = frame(node, width=2)
    huge.message.width = huge.message.height = 100_000
    node.processor.process([huge])
    assert totals(node).rejected == 2
    accounted(node)


def test_stale_frames_are_dropped_but_unstamped_ones_are_not(node):
    assert node.set_parameters([Parameter("max_frame_age", value=1.0)])[0].successful
    spin_until(node, lambda: applied(node, "max_frame_age", 1.0))
    node.processor.process([frame(node, age=5.0)])
    assert totals(node).dropped_stale == 1 and totals(node).processed == 0
    node.processor.process([frame(node, age=0.1)])
    node.processor.process([frame(node, stamped=False)])
    assert totals(node).processed == 2
    accounted(node)


@pytest.mark.parametrize(
    "stamp", [(-1, 0), (-5, 999_999_999), (12, 1_000_000_000), (0, 2**32 - 1)]
)
def test_a_stamp_that_is_no_time_means_age_unknown(node, stamp):
    """Never stale, no latency sample, segmented and published, counted (issue 7, item 4)."""
    assert node.set_parameters([Parameter("max_frame_age", value=1.0)])[0].successful
    spin_until(node, lambda: applied(node, "max_frame_age", 1.0))
    node.processor.process([frame(node, stamp=stamp)])
    assert totals(node).processed == 1 and totals(node).dropped_stale == 0
    assert totals(node).unusable_stamp == 1
    (sample,) = node.cameras[0].stats.window().samples
    assert sample.latency_s is None
    accounted(node)


def test_paused_node_does_not_segment_and_counts_what_it_drops(node):
    node._enabled.clear()
    node.processor.process([frame(node)])  # taken before the pause, handed over after it
    node._on_image(node.cameras[0], message(node))  # arrives while paused
    assert totals(node).processed == 0 and totals(node).received == 2
    assert totals(node).dropped_paused == 2
    assert not node.segmenter.forwards()
    accounted(node)


def test_frames_waiting_when_paused_are_dropped_and_counted(node):
    node._buffer = FrameBuffer()  # a slot the worker does not read: frames stay waiting
    camera = node.cameras[0]
    node._on_image(camera, message(node))
    node._on_image(camera, message(node))  # overwrites the first
    assert totals(node).dropped_overwritten == 1 and totals(node).in_progress == 1
    request = SetBool.Request(data=False)
    assert node._on_enable(request, SetBool.Response()).success
    assert totals(node).dropped_paused == 1
    node._on_image(camera, message(node))
    assert totals(node).dropped_paused == 2
    accounted(node)
    node._on_enable(SetBool.Request(data=True), SetBool.Response())


def test_a_frame_being_published_when_paused_is_counted_once(node):
    """Pausing drops waiting frames; one the worker has already claimed is counted as it ends."""
    claimed, waiting = frame(node), frame(node)
    assert node.frames.claim(claimed)
    node._clear_frames()
    assert claimed.state == "publishing" and waiting.state == "dropped_paused"
    assert not node.frames.claim(waiting)  # the worker skips it
    assert node.frames.settle(claimed, "processed") and not node.frames.settle(claimed, "failed")
    accounted(node)


def test_an_error_publishing_one_frame_costs_no_other_frame(two_cameras, monkeypatch):
    node = two_cameras
    front = node.cameras[0]

    def broken(*args, **kwargs):
        raise RuntimeError("publisher's context is invalid")

    monkeypatch.setattr(front, "publish", broken)
    node.processor.process([frame(node, camera=0), frame(node, camera=1)])
    assert totals(node, 0).failed == 1 and totals(node, 1).processed == 1
    accounted(node)


def test_an_unexpected_error_converting_one_frame_costs_no_other_frame(two_cameras, monkeypatch):
    node = two_cameras
    convert = processing.to_rgb8

    def faulty(message, max_pixels):
        if message.width == 13:
            raise MemoryError("no memory for the conversion")
        return convert(message, max_pixels)

    monkeypatch.setattr(processing, "to_rgb8", faulty)
    node.processor.process([frame(node, camera=0, width=13), frame(node, camera=1)])
    assert totals(node, 0).failed == 1 and totals(node, 1).processed == 1
    accounted(node)


def test_one_bad_stamp_costs_the_other_camera_nothing(two_cameras):
    """The issue's example: two cameras, one sec = -1 stamp, one batch: both published."""
    node = two_cameras
    node.processor.process([frame(node, camera=0, stamp=(-1, 0)), frame(node, camera=1)])
    assert node.segmenter.forwards() == ["segment_many 2"]
    assert [totals(node, c).processed for c in (0, 1)] == [1, 1]
    assert [totals(node, c).batched for c in (0, 1)] == [1, 1]
    assert totals(node, 0).unusable_stamp == 1 and totals(node, 1).unusable_stamp == 0
    accounted(node)


def test_accepted_parameters_reach_the_segmenter_in_the_worker(node):
    results = node.set_parameters(
        [
            Parameter("classes", value=["tv; television", "sofa"]),
            Parameter("method", value="sclip"),
        ]
    )
    assert all(result.successful for result in results)
    spin_until(node, lambda: [c.name for c in node.segmenter.classes] == ["tv", "sofa"])
    spin_until(node, lambda: node.segmenter.config.method == "sclip")
    # The mask topics are made on the executor's thread (issue 18): spin it.
    spin_until(node, lambda: sorted(node.cameras[0].outputs.masks) == ["sofa", "tv"])
    spin_until(node, lambda: node.transactions.change == ("applied", False))


def test_refused_parameters_reach_nothing(node):
    calls = len(node.segmenter.calls)
    result = node.set_parameters([Parameter("classes", value=["cat", "cat"])])[0]
    assert not result.successful and "duplicate" in result.reason
    crop = [Parameter("dense.crop", value=24), Parameter("dense.stride", value=24)]  # one request
    result = node.set_parameters_atomically(crop)
    assert (
        not result.successful
        and "dense.crop 24 must be a multiple of the patch 16" in result.reason
    )
    result = node.set_parameters([Parameter("max_long_side", value=8)])[0]
    assert not result.successful and "below one patch of the model (16 px)" in result.reason
    node._apply_pending()
    assert len(node.segmenter.calls) == calls
    assert node.get_parameter("classes").value == ["cat", "dog"]


def spin_until(node: OvssNode, predicate, timeout: float = 10.0) -> None:
    """Spin the node's executor (parameter reverts run there) until ``predicate()``."""
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    try:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            executor.spin_once(timeout_sec=0.05)
    finally:
        executor.remove_node(node)


def test_failed_vocabulary_change_keeps_the_node_serving_and_the_parameters_truthful(node):
    FaultySegmenter.fail_set_classes = True
    assert node.set_parameters([Parameter("classes", value=["bird"])])[0].successful
    spin_until(node, lambda: node.transactions.change[1])
    FaultySegmenter.fail_set_classes = False
    text, failed = node.transactions.change
    assert failed and text.startswith("classes: RuntimeError: out of memory while encoding")
    assert [c.name for c in node.segmenter.classes] == ["cat", "dog"]
    assert sorted(node.cameras[0].outputs.masks) == ["cat", "dog"]
    node.processor.process([frame(node)])
    assert totals(node).processed == 1
    # `ros2 param get` must not claim a vocabulary that is not in force: put back.
    spin_until(node, lambda: node.get_parameter("classes").value == ["cat", "dog"])
    assert node.transactions.values["classes"] == ["cat", "dog"] and not node.transactions.pending
    # The put-back is no new change: the worker has nothing to apply (no re-queueing).
    calls = len(node.segmenter.calls)
    node._apply_pending()
    assert len(node.segmenter.calls) == calls
    # A later change that works is applied, and clears the failure.
    assert node.set_parameters([Parameter("classes", value=["bird"])])[0].successful
    spin_until(node, lambda: node.transactions.change == ("applied", False))
    assert [c.name for c in node.segmenter.classes] == ["bird"]


def test_a_change_is_applied_whole_or_not_at_all(node):
    """templates (engine), overlay_alpha (node) and classes in one request; the vocabulary
    fails: the engine gets its old templates back, the node its old overlay weight, and every
    parameter shows the value in force again."""
    FaultySegmenter.fail_set_classes = True
    result = node.set_parameters_atomically(
        [
            Parameter("templates", value="a photo of a {}.|a {} in a room"),
            Parameter("overlay_alpha", value=0.9),
            Parameter("classes", value=["bird"]),
        ]
    )
    assert result.successful
    spin_until(node, lambda: node.transactions.change[1])
    FaultySegmenter.fail_set_classes = False
    assert node.segmenter.config.templates == "single"
    assert node.transactions.applied_settings.overlay_alpha == 0.5
    spin_until(
        node,
        lambda: (
            (
                node.get_parameter("templates").value,
                node.get_parameter("overlay_alpha").value,
                node.get_parameter("classes").value,
            )
            == ("single", 0.5, ["cat", "dog"])
        ),
    )


def test_a_newer_change_is_not_put_back(node):
    """A change that failed is put back only if nobody changed the parameter since."""
    FaultySegmenter.fail_set_classes = True
    assert node.set_parameters([Parameter("classes", value=["bird"])])[0].successful
    # Without spinning: the executor must not put it back yet.
    deadline = time.monotonic() + 10.0
    while not node.transactions.change[1]:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    assert node.transactions.reverts
    FaultySegmenter.fail_set_classes = False
    # Before the executor puts it back, the user asks for another vocabulary.
    assert node.set_parameters([Parameter("classes", value=["fish"])])[0].successful
    spin_until(node, lambda: [c.name for c in node.segmenter.classes] == ["fish"])
    spin_until(node, lambda: not node.transactions.reverts)
    assert node.get_parameter("classes").value == ["fish"]


def test_a_failed_change_registers_its_reverts_before_it_says_failed(node, monkeypatch):
    """Whoever sees the status say "failed" (``change[1]``) sees what is to be put back: the
    reverts are registered first (the test above polls the status, then reads the reverts; the
    other order failed it under load). Checked at the failure's log line, which follows the
    status."""
    logger, seen = node.get_logger(), []

    class Recorder:
        def __getattr__(self, name):
            return getattr(logger, name)

        def error(self, message, *args, **kwargs):
            seen.append((node.transactions.change[1], dict(node.transactions.reverts)))
            return logger.error(message, *args, **kwargs)

    monkeypatch.setattr(node, "get_logger", Recorder)
    FaultySegmenter.fail_set_classes = True
    assert node.set_parameters([Parameter("classes", value=["owl"])])[0].successful
    spin_until(node, lambda: seen)
    FaultySegmenter.fail_set_classes = False
    failed, reverts = seen[0]
    assert failed and "classes" in reverts
    spin_until(node, lambda: node.get_parameter("classes").value == ["cat", "dog"])


def test_a_mask_topic_that_cannot_be_created_costs_no_other_output(node, monkeypatch):
    create = node.create_publisher

    def faulty(message_type, topic, *args, **kwargs):
        if topic.endswith("/masks/cow"):
            raise RuntimeError("rcl could not create the publisher")
        return create(message_type, topic, *args, **kwargs)

    monkeypatch.setattr(node, "create_publisher", faulty)
    published = []
    outputs = node.cameras[0].outputs
    monkeypatch.setattr(outputs.label_info, "publish", published.append)
    assert node.set_parameters([Parameter("classes", value=["cow", "bird", "fish"])])[0].successful
    spin_until(node, lambda: published)
    assert [entry.class_name for entry in published[-1].class_map] == ["cow", "bird", "fish"]
    assert sorted(outputs.masks) == ["bird", "fish"]
    node.processor.process([frame(node)])
    assert totals(node).processed == 1


def test_destroy_node_stops_the_worker(node):
    worker = node._worker
    assert worker.alive
    node.destroy_node()
    assert not worker.alive


def test_frames_of_two_cameras_share_one_forward_and_are_counted_as_batched(two_cameras):
    node = two_cameras
    assert [camera.name for camera in node.cameras] == ["front", "rear"]
    node.processor.process([frame(node, camera=0), frame(node, camera=1)])
    assert node.segmenter.forwards() == ["segment_many 2"]
    for camera in (0, 1):
        assert totals(node, camera).processed == 1 and totals(node, camera).batched == 1
    # Different sizes after resizing: one call, but two forward passes in the engine.
    node.processor.process([frame(node, camera=0), frame(node, camera=1, width=300)])
    assert totals(node, 0).batched == 1 and totals(node, 1).processed == 2


def test_failed_batch_costs_only_the_frames_that_fail_alone(two_cameras):
    node = two_cameras
    FaultySegmenter.fail_width = 13  # the rear camera's frames cannot be segmented
    node.processor.process([frame(node, camera=0), frame(node, camera=1, width=13)])
    assert node.segmenter.forwards() == ["segment_many 2", "segment_many 1", "segment_many 1"]
    assert totals(node, 0).processed == 1 and totals(node, 0).failed == 0
    assert totals(node, 1).processed == 0 and totals(node, 1).failed == 1
    assert totals(node, 0).batched == 0  # it was segmented alone in the end


def test_batch_that_fails_whole_loses_those_frames_and_the_next_batch_is_served(two_cameras):
    node = two_cameras
    FaultySegmenter.fail_segment = True  # e.g. the GPU is out of memory for a while
    node.processor.process([frame(node, camera=0), frame(node, camera=1)])
    assert [totals(node, c).failed for c in (0, 1)] == [1, 1]
    FaultySegmenter.fail_segment = False
    node.processor.process([frame(node, camera=0), frame(node, camera=1)])
    assert [totals(node, c).processed for c in (0, 1)] == [1, 1]
    assert [totals(node, c).failed for c in (0, 1)] == [1, 1]


def test_diagnostics_level_follows_the_failures_in_the_window(two_cameras):
    node = two_cameras
    state = NodeState(device="cpu", vocabulary_size=2, enabled=True)
    FaultySegmenter.fail_width = 13
    node.processor.process([frame(node, camera=0), frame(node, camera=1, width=13)])
    front = camera_report(node.cameras[0].stats.window(), state)
    rear = camera_report(node.cameras[1].stats.window(), state)
    assert front.level == OK and rear.level == ERROR
    assert rear.value("frames failed") == "1" and "every frame" in rear.message
    node.processor.process(
        [frame(node, camera=1)]
    )  # a frame the model takes: only some failed now
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


def test_frames_waiting_when_the_managed_node_deactivates_are_counted(monkeypatch):
    """Deactivating drops the frames waiting in the slots, as pausing does, and counts them."""
    from ovss_ros.ros.lifecycle_node import OvssLifecycleNode

    isolate_dds()
    monkeypatch.setattr(segmenter_module, "Segmenter", FaultySegmenter)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = OvssLifecycleNode(
        context=context,
        parameter_overrides=[
            Parameter(name, value=value) for name, value in TINY_NODE_PARAMETERS.items()
        ],
    )
    try:
        node.trigger_configure()
        node.trigger_activate()
        node._buffer = FrameBuffer()  # a slot the worker does not read: frames stay waiting
        node._on_image(node.cameras[0], message(node))
        assert totals(node).in_progress == 1
        node.trigger_deactivate()
        assert totals(node).dropped_paused == 1
        accounted(node)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_log_text_is_one_line_with_control_characters_escaped():
    text = log_text.one_line("yuv\n[ERROR] [ovss]: forged\x1b[31m \u202eevil 椅子")
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text
    assert text == "yuv [ERROR] [ovss]: forged\\u001b[31m \\u202eevil 椅子"
    assert log_text.describe(RuntimeError("out of\nmemory")) == "RuntimeError: out of memory"
    assert len(log_text.one_line("x" * 1000)) == 400


def test_a_stop_is_no_failure(two_cameras):
    """The engine raising Stopped (the node is shutting down): the frames in hand are dropped,
    not failed, no change is put back, and Stopped reaches the worker (which ends quietly)."""
    node = two_cameras
    FaultySegmenter.stopped = True
    with pytest.raises(Stopped):
        node.processor.process([frame(node, camera=0), frame(node, camera=1)])
    assert [totals(node, c).dropped_paused for c in (0, 1)] == [1, 1]
    assert [totals(node, c).failed for c in (0, 1)] == [0, 0]
    accounted(node)
    with node.transactions.lock:
        node.transactions.pending = {"classes": ["bird"]}
    with pytest.raises(Stopped):  # the change encoder's step: it ends quietly
        node.transactions.prepare(node.segmenter, node.segmenter.stop)
    assert node.transactions.change == ("none", False) and not node.transactions.reverts
