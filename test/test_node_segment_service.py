"""``~/segment`` (ovss_interfaces) on the node and the managed node, over real DDS, the node in
its own process (``vocabulary_clients.serve``: under test/fault_injection_node.py, whose text
encoder holds a batch of prompts with ``HOLD_WORD`` until the test releases it, so that a
request can be kept in progress while the test races it). Checked: the answers (success, every
refusal with its reason, counters), that ``~/segment`` leaves the streaming vocabulary alone,
that the executor takes frames and answers other services while a request is encoded, that
camera frames are segmented and published while a request's words are encoded (the frames wait
for its forward pass only), the queue's bounds, and that a shutdown stops an encoding at once.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from fault_injection_node import GATE_TIMEOUT_S, HOLD_WORD, TRIGGER_WORD
from rclpy.qos import QoSProfile
from ros_harness import (
    EVENT_TIMEOUT_S,
    image_array,
    make_compressed,
    make_image,
    next_header,
    shutdown_problems,
    status_values,
)
from vocabulary_clients import (
    LONG_PROMPT,
    MAX_PIXELS,
    SEGMENT_STATUS,
    STREAM,
    classes_parameter,
    in_force,
    label_names,
    photo,
    segment_request,
    serve,
    streamed_names,
    wait_answer,
)

from ovss_interfaces.srv import Segment

BURST = 40  # ~/segment requests sent at once: beyond rclpy's default service queue (10)


@pytest.fixture(scope="module", params=["node", "lifecycle"])
def served(request, tmp_path_factory):
    """(OvssClient, VocabularyClients, fault dir, NodeProcess) of a running (active) node."""
    yield from serve(request.param, tmp_path_factory)


@pytest.fixture()
def node(served):
    """The served node with STREAM, single templates and no background words in force."""
    return in_force(served)


def test_segment_answers_without_touching_the_stream(node):
    client, services, _, _ = node
    rgb = photo(96, 64)
    answer = services.segment(segment_request(client.node, rgb, ["sky", "grass; lawn", "car"]))
    assert answer.success, answer.reason
    labels, confidence = image_array(answer.labels), image_array(answer.confidence)
    assert labels.shape == (64, 96) and answer.labels.encoding == "mono8"
    assert confidence.shape == (64, 96) and np.all((confidence >= 0) & (confidence <= 1))
    assert label_names(answer.label_info) == ["sky", "grass", "car"]
    assert len(answer.pixel_counts) == 3
    assert sum(answer.pixel_counts) + answer.unlabeled_pixels == 96 * 64
    for value, count in enumerate(answer.pixel_counts):
        assert int(np.count_nonzero(labels == value)) == count
    assert int(np.count_nonzero(labels == 255)) == answer.unlabeled_pixels
    assert answer.labels.header.frame_id.startswith("camera_")
    # The streaming vocabulary: unchanged in the parameters and on the frames.
    assert classes_parameter(client) == STREAM
    assert streamed_names(client) == STREAM
    values = status_values(
        client.wait_for_status(SEGMENT_STATUS, lambda v: int(v["succeeded"]) >= 1)
    )
    assert int(values["requests"]) >= 1


def test_segment_takes_a_compressed_image(node):
    client, services, _, _ = node
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(photo(80, 60), cv2.COLOR_RGB2BGR))
    request = segment_request(client.node, None, ["sky", "grass"])
    request.compressed_image = make_compressed(jpeg.tobytes(), next_header(client.node))
    answer = services.segment(request)
    assert answer.success, answer.reason
    assert (answer.labels.height, answer.labels.width) == (60, 80)
    assert sum(answer.pixel_counts) + answer.unlabeled_pixels == 80 * 60


def refused_segment_requests(node_handle):
    """(name, request, words its reason must have) for every kind of refusal."""
    both = segment_request(node_handle, photo(), ["sky"])
    both.compressed_image = make_compressed(b"\xff\xd8 not a jpeg", next_header(node_handle))
    garbage = segment_request(node_handle, None, ["sky"])
    garbage.compressed_image = make_compressed(b"\xff\xd8 not a jpeg", next_header(node_handle))
    odd = segment_request(node_handle, photo(), ["sky"])
    odd.image.encoding = "bgr9"
    short = segment_request(node_handle, photo(), ["sky"])
    short.image.data = short.image.data[:-7]
    return [
        ("neither", segment_request(node_handle, None, ["sky"]), "no image"),
        ("both", both, "exactly one"),
        ("no words", segment_request(node_handle, photo(), []), "class"),
        ("duplicate words", segment_request(node_handle, photo(), ["sky", "sky"]), "sky"),
        ("long prompt", segment_request(node_handle, photo(), [LONG_PROMPT]), "token"),
        ("too large", segment_request(node_handle, photo(200, 101), ["sky"]), str(MAX_PIXELS)),
        ("encoding", odd, "bgr9"),
        ("short data", short, "data"),
        ("not a jpeg", garbage, "undecodable"),
    ]


def test_segment_refusals(node):
    client, services, _, _ = node
    before = client.counter("refused", SEGMENT_STATUS) if client.statuses(SEGMENT_STATUS) else 0
    cases = refused_segment_requests(client.node)
    for name, request, reason in cases:
        answer = services.segment(request)
        assert not answer.success, name
        assert reason.lower() in answer.reason.lower(), (name, answer.reason)
        assert answer.labels.width == 0 and not answer.pixel_counts, name
    client.wait_for_status(
        SEGMENT_STATUS, lambda v: int(v["refused"]) >= before + len(cases), EVENT_TIMEOUT_S
    )
    assert classes_parameter(client) == STREAM
    assert streamed_names(client) == STREAM


def test_the_executor_serves_while_segment_runs(node):
    """A ``~/segment`` request is held while its words are encoded: meanwhile the node takes
    camera frames (counted), answers its parameters, ``~/enable``, a refused ``~/segment`` and a
    refused ``~/set_vocabulary``; once it answers, frames are segmented with the stream's
    vocabulary again."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    future = services.segment_client.call_async(
        segment_request(client.node, photo(), [f"{HOLD_WORD} sky", "grass"])
    )
    client.spin_until(held.exists, message="the ~/segment request held while encoding")
    assert classes_parameter(client) == STREAM
    assert client.enable(True).success
    assert not services.segment(segment_request(client.node, None, ["sky"])).success
    assert not services.set_vocabulary([]).success
    frame = make_image(photo(), "rgb8", next_header(client.node))
    client.publish_until_counted(frame, "frames received")
    assert held.exists() and not future.done()  # all of the above while it was held
    (fault_dir / "encoding_release").touch()
    answer = wait_answer(client, future)
    assert answer.success, answer.reason
    assert label_names(answer.label_info) == [f"{HOLD_WORD} sky", "grass"]
    assert streamed_names(client) == STREAM


def test_camera_frames_are_segmented_while_a_request_is_encoded(node):
    """A ``~/segment`` request's words are held while being encoded: camera frames are
    segmented and published meanwhile, with the stream's vocabulary (the frames wait for the
    request's forward pass alone, never for its encoding); once released, the request is
    answered for its own words, and the stream is still the stream's."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    future = services.segment_client.call_async(
        segment_request(client.node, photo(), [f"{HOLD_WORD} gull", "sand"])
    )
    client.spin_until(held.exists, message="the ~/segment request held while encoding")
    for _ in range(3):  # labels out, frame after frame, while the request is held
        assert streamed_names(client) == STREAM
    assert held.exists() and not future.done()
    (fault_dir / "encoding_release").touch()
    answer = wait_answer(client, future)
    assert answer.success, answer.reason
    assert label_names(answer.label_info) == [f"{HOLD_WORD} gull", "sand"]
    assert (answer.labels.height, answer.labels.width) == (64, 96)
    assert sum(answer.pixel_counts) + answer.unlabeled_pixels == 96 * 64
    assert streamed_names(client) == STREAM


def test_a_change_put_in_force_while_a_request_encodes_leaves_its_answer_right(node):
    """A ``~/segment`` request's words held while being encoded; meanwhile a change of the
    classes and templates is encoded and put in force (``~/set_vocabulary``; frames show it):
    once released, the request (prepared against the older state) is prepared again for the
    templates in force, then answered for its own words; the stream keeps the change."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    future = services.segment_client.call_async(
        segment_request(client.node, photo(), [f"{HOLD_WORD} plover", "dune"])
    )
    client.spin_until(held.exists, message="the ~/segment request held while encoding")
    # ~/set_vocabulary: both in force at once, answered once they are (frames flow meanwhile).
    changed = services.set_vocabulary(["lamp", "sofa"], "imagenet")
    assert changed.success, changed.reason
    assert streamed_names(client) == ["lamp", "sofa"]
    assert held.exists() and not future.done()
    holds = fault_dir / "encoding_holds"
    count = len(holds.read_text())
    (fault_dir / "encoding_release").touch()
    # Prepared again for the templates in force now: its words encoded (and held) once more.
    # On the nice +10 thread, beside other load, 80 templates take a while.
    client.spin_until(
        lambda: future.done() or len(holds.read_text()) > count,
        4 * EVENT_TIMEOUT_S,
        message="prepared again",
    )
    assert not future.done(), future.result().reason
    (fault_dir / "encoding_release").touch()
    answer = wait_answer(client, future)
    assert answer.success, answer.reason
    assert label_names(answer.label_info) == [f"{HOLD_WORD} plover", "dune"]
    assert sum(answer.pixel_counts) + answer.unlabeled_pixels == 96 * 64
    assert streamed_names(client) == ["lamp", "sofa"]


def test_segment_requests_beyond_the_queue_are_refused(node):
    """One request held while encoded, MAX_QUEUED (2) waiting: the next is refused at once,
    busy; once the held one is released, every accepted request is answered."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    first = services.segment_client.call_async(
        segment_request(client.node, photo(), [f"{HOLD_WORD} kite"])  # never encoded before
    )
    client.spin_until(held.exists, message="the first ~/segment request held")
    waiting = [
        services.segment_client.call_async(segment_request(client.node, photo(), [word]))
        for word in ("grass", "road")
    ]
    client.wait_for_status(SEGMENT_STATUS, lambda v: int(v["queued"]) == 2)
    refused = services.segment(segment_request(client.node, photo(), ["tree"]))
    assert not refused.success and "busy" in refused.reason, refused.reason
    (fault_dir / "encoding_release").touch()
    for future in (first, *waiting):
        answer = wait_answer(client, future)
        assert answer.success, answer.reason
    assert [label_names(wait_answer(client, f).label_info) for f in waiting] == [
        ["grass"],
        ["road"],
    ]


def test_a_camera_frame_waits_for_at_most_one_segment_request(node):
    """Request A held while encoded, B queued behind it (its words held too once it runs), a
    camera frame taken meanwhile: once A is answered the frame is segmented while B is still
    held, not after every queued request (a flood of requests never starves the cameras)."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    first = services.segment_client.call_async(
        segment_request(client.node, photo(), [f"{HOLD_WORD} heron"])
    )
    client.spin_until(held.exists, message="the first ~/segment request held")
    second = services.segment_client.call_async(
        segment_request(client.node, photo(), [f"{HOLD_WORD} egret"])
    )
    client.wait_for_status(SEGMENT_STATUS, lambda v: int(v["queued"]) == 1)
    frame = make_image(photo(), "rgb8", next_header(client.node))
    client.publish_until_counted(frame, "frames received")
    holds = fault_dir / "encoding_holds"
    count = len(holds.read_text())
    (fault_dir / "encoding_release").touch()
    assert wait_answer(client, first).success
    client.spin_until(
        lambda: client.find("labels", frame.header) is not None,
        2 * EVENT_TIMEOUT_S,
        message="the camera frame segmented between the two requests",
    )
    client.spin_until(lambda: len(holds.read_text()) > count, message="the second one held")
    assert not second.done()  # the frame did not wait for it
    (fault_dir / "encoding_release").touch()
    answer = wait_answer(client, second)
    assert answer.success, answer.reason
    assert label_names(answer.label_info) == [f"{HOLD_WORD} egret"]


def test_a_burst_of_segment_requests_is_answered_whole(node):
    """One request held while encoded, then BURST more sent at once: every one is answered
    (MAX_QUEUED succeed, the rest are refused as busy and counted), none dropped unanswered."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    burst_client = client.node.create_client(
        Segment, f"{client.ns}/segment", qos_profile=QoSProfile(depth=2 * BURST)
    )
    client.spin_until(burst_client.service_is_ready, message="the burst's client")
    before = client.counter("refused", SEGMENT_STATUS) if client.statuses(SEGMENT_STATUS) else 0
    first = burst_client.call_async(segment_request(client.node, photo(), [f"{HOLD_WORD} wren"]))
    client.spin_until(held.exists, message="the first ~/segment request held")
    futures = [
        burst_client.call_async(segment_request(client.node, photo(32, 32), [f"burst {i}"]))
        for i in range(BURST)
    ]
    client.spin_until(
        lambda: sum(f.done() for f in futures) >= BURST - 2,
        2 * EVENT_TIMEOUT_S,
        message=lambda: f"{sum(f.done() for f in futures)} of {BURST} answered while held",
    )
    (fault_dir / "encoding_release").touch()
    answers = [wait_answer(client, future) for future in (first, *futures)]
    refused = [a.reason for a in answers if not a.success]
    assert len(refused) == BURST - 2 and all("busy" in r for r in refused), refused
    client.wait_for_status(
        SEGMENT_STATUS, lambda v: int(v["refused"]) >= before + BURST - 2, EVENT_TIMEOUT_S
    )
    client.node.destroy_client(burst_client)


def test_the_segment_status_comes_in_the_nodes_one_diagnostics_array(node):
    """The node publishes one DiagnosticArray a tick: the segment service's status comes in it,
    beside the camera's, never in an array of its own."""
    client, services, _, _ = node
    assert services.segment(segment_request(client.node, photo(), ["sky"])).success
    client.messages["/diagnostics"].clear()
    client.wait_for_status(SEGMENT_STATUS, lambda v: True)
    names = [{s.name for s in array.status} for array in client.messages["/diagnostics"]]
    assert all("ovss: image" in each for each in names if SEGMENT_STATUS in each), names


def test_a_segment_request_that_fails_is_answered_and_counted(node):
    client, services, _, _ = node
    request = segment_request(client.node, photo(), [f"{TRIGGER_WORD} cup", "plate"])
    answer = services.segment(request)
    assert not answer.success
    assert "out of memory" in answer.reason, answer.reason
    status = client.wait_for_status(SEGMENT_STATUS, lambda v: int(v["failed"]) >= 1)
    assert status.level == DiagnosticStatus.WARN
    assert streamed_names(client) == STREAM
    assert services.segment(segment_request(client.node, photo(), ["plate"])).success


def test_shutdown_while_a_request_encodes_ends_the_node_at_once(served):
    """Last in this module: it ends the module's node (whose fixture then checks status 0). A
    ``~/segment`` request's words held while being encoded: Ctrl-C stops the encoding at once
    (the stop event, not the gate giving up) and the node exits cleanly."""
    client, services, fault_dir, process = served
    held = fault_dir / "encoding_held"
    services.segment_client.call_async(
        segment_request(client.node, photo(), [f"{HOLD_WORD} at shutdown"])
    )
    client.spin_until(held.exists, message="the ~/segment request held while encoding")
    start = time.monotonic()
    returncode = process.stop()
    took = time.monotonic() - start
    assert returncode == 0, process.output()
    assert took < GATE_TIMEOUT_S / 5, took
    assert not held.exists()
    assert not shutdown_problems(process.output()), process.output()
