"""``~/set_vocabulary`` and ``~/segment`` (ovss_interfaces) on the node and the managed node,
over real DDS, the node in its own process.

The node runs under test/fault_injection_node.py (the real node; its text encoder holds a batch
of prompts with ``HOLD_WORD`` until the test releases it), so that a change or a request can be
kept in progress while the test races it. Checked: the answers (success, every refusal with its
reason), that the parameters show what the service set, that a parameter change racing the
service leaves one whole vocabulary in force, that ``~/segment`` leaves the streaming vocabulary
alone, and that the executor takes frames and answers other services while ``~/segment`` runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from fault_injection_node import HOLD_WORD, MODULE, TRIGGER_WORD
from lifecycle_msgs.msg import Transition
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile
from ros_harness import (
    EVENT_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    Lifecycle,
    NodeProcess,
    OvssClient,
    call_service,
    image_array,
    isolate_dds,
    make_compressed,
    make_image,
    next_header,
    startup_timeout,
    status_values,
)
from vocabulary_clients import (
    VocabularyClients,
    label_names,
    segment_request,
    vocabulary_request,
)

from ovss_interfaces.srv import Segment

STREAM = ["cat", "dog"]
LONG_PROMPT = " ".join(["x"] * 95)  # 95 tokens: beyond CLIP's 77, within the 200 characters
MAX_PIXELS = 20000  # max_input_pixels: 141x141 passes, 200x101 is refused
SEGMENT_STATUS = "ovss: segment service"
BURST = 40  # ~/segment requests sent at once: beyond rclpy's default service queue (10)


@pytest.fixture(scope="module", params=["node", "lifecycle"])
def served(request, tmp_path_factory):
    """(OvssClient, VocabularyClients, fault dir, NodeProcess) of a running (active) node."""
    isolate_dds()
    fault_dir = tmp_path_factory.mktemp("faults")
    test_dir = str(Path(__file__).resolve().parent)
    names = ("PYTHONPATH", "OVSS_FAULT_DIR", "OVSS_FAULT_LIFECYCLE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [test_dir, saved["PYTHONPATH"]]))
    os.environ["OVSS_FAULT_DIR"] = str(fault_dir)
    os.environ["OVSS_FAULT_LIFECYCLE"] = "1" if request.param == "lifecycle" else "0"
    try:
        parameters = TINY_NODE_PARAMETERS | {"classes": STREAM, "max_input_pixels": MAX_PIXELS}
        process = NodeProcess(parameters, module=MODULE)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    rclpy.init()
    client = OvssClient("/ovss", "")
    try:
        if request.param == "lifecycle":
            lifecycle = Lifecycle(client, "/ovss")
            assert lifecycle.state(timeout=startup_timeout()) == "unconfigured", process.output()
            lifecycle.activate()
        client.spin_until(
            lambda: process.returncode is not None or client.ready(),
            startup_timeout(),
            message=lambda: f"node start-up; its output:\n{process.output()}",
        )
        assert process.returncode is None, process.output()
        services = VocabularyClients(client)
        services.wait_ready()
        yield client, services, fault_dir, process
    finally:
        client.destroy()
        rclpy.shutdown()
        (fault_dir / "encoding_release").touch()
        returncode = process.stop()
    assert returncode == 0, process.output()


@pytest.fixture()
def node(served):
    """The served node with STREAM, single templates and no background words in force."""
    client, services, fault_dir, process = served
    answer = services.set_vocabulary(STREAM, "single", background_words=[])
    assert answer.success, answer.reason
    return served


def photo(width: int = 96, height: int = 64) -> np.ndarray:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2] = (90, 150, 230)  # a sky-ish top, a grass-ish bottom
    rgb[height // 2 :] = (40, 160, 40)
    return rgb


def streamed_names(client) -> list[str]:
    """The class names of the label_info published with a new frame's labels."""
    message = make_image(photo(), "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "label_info"))
    return label_names(out["label_info"])


def classes_parameter(client) -> list[str]:
    return list(client.get_parameter("classes"))


def test_set_vocabulary_is_in_force_and_in_the_parameters(node):
    client, services, _, _ = node
    answer = services.set_vocabulary(["person; human", "tv | a flat screen"], "imagenet", ["sky"])
    assert answer.success, answer.reason
    assert answer.reason == ""
    assert label_names(answer.label_info) == ["person", "tv"]
    assert classes_parameter(client) == ["person; human", "tv | a flat screen"]
    assert client.get_parameter("templates") == "imagenet"
    assert list(client.get_parameter("background_words")) == ["sky"]
    assert streamed_names(client) == ["person", "tv"]


REFUSED_VOCABULARIES = [
    # (classes, templates, background words (None: kept), words the reason must have)
    ([], "", None, "classes"),
    (["cat", "cat"], "", None, "cat"),
    (["cat", ""], "", None, "empty"),
    (["tree"], "a photo of a", None, "{}"),
    ([LONG_PROMPT], "", None, "token"),
    (["tree"], "", [LONG_PROMPT], "token"),
    (["bad\x07name"], "", None, "character"),
]


@pytest.mark.parametrize("classes, templates, background, reason", REFUSED_VOCABULARIES)
def test_set_vocabulary_refusals_change_nothing(node, classes, templates, background, reason):
    client, services, _, _ = node
    answer = services.set_vocabulary(classes, templates, background)
    assert not answer.success
    assert reason.lower() in answer.reason.lower(), answer.reason
    assert label_names(answer.label_info) == STREAM  # the vocabulary in force, unchanged
    assert classes_parameter(client) == STREAM
    assert client.get_parameter("templates") == "single"
    assert streamed_names(client) == STREAM


def test_set_vocabulary_refuses_background_words_it_may_not_set(node):
    client, services, _, _ = node
    request = vocabulary_request(["tree"])
    request.background_words = ["sky"]  # with set_background_words false
    answer = call_service(client.node, services.set_client, request)
    assert not answer.success
    assert "set_background_words" in answer.reason
    assert classes_parameter(client) == STREAM


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


def wait_answer(client, future, timeout: float = 2 * EVENT_TIMEOUT_S):
    client.spin_until(future.done, timeout, message="the service's answer")
    return future.result()


def classes_change(classes: list[str]) -> list[Parameter]:
    return [Parameter("classes", Parameter.Type.STRING_ARRAY, classes)]


def test_a_parameter_change_racing_the_service_leaves_one_vocabulary(node):
    """The service's change is being encoded (held) when ``classes`` is set: the newer values
    win, whole; the service's answer says what is in force."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    future = services.set_client.call_async(
        vocabulary_request([f"{HOLD_WORD} chair", "table"], background_words=["sky"])
    )
    client.spin_until(held.exists, message="the service's change held while encoding")
    assert client.set_parameters(classes_change(["lamp", "sofa"]))[0].successful
    answer = wait_answer(client, future)
    assert answer.success, answer.reason
    assert label_names(answer.label_info) == ["lamp", "sofa"]
    assert classes_parameter(client) == ["lamp", "sofa"]
    assert list(client.get_parameter("background_words")) == ["sky"]  # the service's, kept
    assert streamed_names(client) == ["lamp", "sofa"]


def test_the_service_racing_a_parameter_change_wins_whole(node):
    """A ``classes`` change is being encoded (held) when the service sets another vocabulary:
    the service's is in force when it answers, and the parameters show it."""
    client, services, fault_dir, _ = node
    held = fault_dir / "encoding_held"
    assert client.set_parameters(classes_change([f"{HOLD_WORD} lamp", "sofa"]))[0].successful
    client.spin_until(held.exists, message="the parameter change held while encoding")
    future = services.set_client.call_async(vocabulary_request(["chair", "table"]))
    answer = wait_answer(client, future)
    assert answer.success, answer.reason
    assert label_names(answer.label_info) == ["chair", "table"]
    assert classes_parameter(client) == ["chair", "table"]
    assert streamed_names(client) == ["chair", "table"]


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


def test_segment_requests_beyond_the_queue_are_refused(node):
    """One request held on the worker, MAX_QUEUED (2) waiting: the next is refused at once,
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
    """Request A held on the worker, B queued behind it (its words held too once it runs), a
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
    """One request held on the worker, then BURST more sent at once: every one is answered
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


def test_a_change_that_fails_while_preparing_is_answered_with_why(node):
    """Accepted, then out of memory while encoding (injected): the answer says so, the old
    vocabulary stays in force and the parameters are put back to it."""
    client, services, _, _ = node
    answer = services.set_vocabulary([f"{TRIGGER_WORD} cup", "plate"])
    assert not answer.success
    assert "out of memory" in answer.reason, answer.reason
    assert label_names(answer.label_info) == STREAM
    client.spin_until(lambda: classes_parameter(client) == STREAM, message="classes put back")
    assert streamed_names(client) == STREAM


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


def test_the_managed_node_refuses_while_inactive_or_unconfigured(served, request):
    """Inactive: ``~/segment`` is refused, a vocabulary is put in force (the worker runs).
    A change still encoding at cleanup is answered then; unconfigured, both services refuse;
    the next configure loads the vocabulary the parameters hold."""
    if request.node.callspec.params["served"] != "lifecycle":
        pytest.skip("the plain node has no lifecycle states")
    client, services, fault_dir, _ = served
    lifecycle = Lifecycle(client, "/ovss")
    assert lifecycle.transition(Transition.TRANSITION_DEACTIVATE)
    answer = services.segment(segment_request(client.node, photo(), ["sky"]))
    assert not answer.success and "not active" in answer.reason, answer.reason
    assert services.set_vocabulary(["cat", "bird"], "single", []).success
    assert classes_parameter(client) == ["cat", "bird"]

    held = fault_dir / "encoding_held"
    future = services.set_client.call_async(vocabulary_request([f"{HOLD_WORD} owl", "bird"]))
    client.spin_until(held.exists, message="the change held while encoding")
    assert lifecycle.transition(Transition.TRANSITION_CLEANUP)
    answer = wait_answer(client, future)
    assert not answer.success and "next configure" in answer.reason, answer.reason
    for refused in (
        services.set_vocabulary(["eagle"]),
        services.segment(segment_request(client.node, photo(), ["sky"])),
    ):
        assert not refused.success and "not configured" in refused.reason, refused.reason
    assert classes_parameter(client) == [f"{HOLD_WORD} owl", "bird"]

    (fault_dir / "encoding_release").touch()  # the configure encodes the held word once more
    lifecycle.activate()
    assert streamed_names(client) == [f"{HOLD_WORD} owl", "bird"]
