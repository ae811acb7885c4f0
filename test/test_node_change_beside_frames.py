"""Frames never wait for a parameter change, over real DDS, the node in its own process.

A change is prepared (its texts encoded) beside the frame worker, which keeps segmenting and
publishing with the vocabulary in force; the prepared change is swapped in between two frames.
The encoding is held on demand by test/fault_injection_node.py (a class with ``hold_encoding``:
the real text encoder waits on a file the test creates, and ends the wait with Stopped like
between two prompt batches), so nothing here depends on timing:

- frames are published, with the old vocabulary in their label_info, while a change encodes;
  diagnostics say ``encoding N texts``; then the new vocabulary arrives whole;
- a change that fails after encoding for a while: frames flowed meanwhile, the parameters are
  put back;
- a newer change supersedes one still encoding (the held encoding stops) and wins;
- a threshold accepted while a vocabulary encodes is never in force with the old vocabulary;
- a method switch accepted while a vocabulary encodes goes in force with it (and back);
- a refused change leaves the change being encoded alone (it is not superseded);
- shutdown during an encoding ends the node at once, cleanly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fault_injection_node import GATE_TIMEOUT_S, HOLD_WORD, TRIGGER_WORD, running_fault_node
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    call_service,
    image_array,
    make_image,
    next_header,
)

CLASSES = ["cat", "dog"]
STATUS = "ovss: image"


class EncodingGate:
    """The test's side of the encoding gate."""

    def __init__(self, fault_dir: Path) -> None:
        self.held = fault_dir / "encoding_held"
        self.release_file = fault_dir / "encoding_release"

    def holds(self) -> int:
        """How many times an encoding was held so far."""
        path = self.held.with_name("encoding_holds")
        return len(path.read_text()) if path.exists() else 0

    def wait_held(self, client) -> None:
        client.spin_until(self.held.exists, message="text encoding held at the gate")

    def release(self, client) -> None:
        self.release_file.touch()
        client.spin_until(lambda: not self.held.exists(), message="encoding gate released")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("change_beside_frames")
    with running_fault_node(TINY_NODE_PARAMETERS | {"classes": CLASSES}, folder) as running:
        yield (*running, EncodingGate(folder))


@pytest.fixture
def client(node):
    client, process, _ = node
    client.clear()
    yield client
    assert process.returncode is None, f"node died:\n{process.output()}"


@pytest.fixture(scope="module")
def rgb(voc_rgb) -> np.ndarray:
    return np.ascontiguousarray(voc_rgb[1][:96, :128])


def segment(client, rgb):
    """Labels and label_info of one new frame, matched by its header."""
    message = make_image(rgb, "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "label_info"))
    return image_array(out["labels"]), [entry.class_name for entry in out["label_info"].class_map]


def label_infos(client) -> set[tuple[str, ...]]:
    """Every vocabulary label_info told so far (since the last clear)."""
    messages = client.messages[client.topic("label_info")]
    return {tuple(entry.class_name for entry in message.class_map) for message in messages}


def latest_label_info(client):
    messages = client.messages[client.topic("label_info")]
    return [entry.class_name for entry in messages[-1].class_map] if messages else None


def wait_for_change(client, predicate):
    return client.wait_for_status(STATUS, lambda values: predicate(values["parameter change"]))


def set_classes(client, classes) -> None:
    result = client.set_parameters([Parameter("classes", value=classes)])[0]
    assert result.successful, result.reason


def restore(client) -> None:
    set_classes(client, CLASSES)
    client.spin_until(lambda: latest_label_info(client) == CLASSES)


def frames_with_the_old_vocabulary(client, rgb, gate, count: int = 3) -> None:
    """``count`` frames segmented and published with CLASSES while the encoding is held."""
    for _ in range(count):
        labels, names = segment(client, rgb)
        assert names == CLASSES
        assert int(labels.max()) < len(CLASSES)
    assert gate.held.exists()  # still encoding: those frames did not wait for it


def test_frames_are_published_while_a_change_encodes_and_the_new_vocabulary_swaps_in_whole(
    node, client, rgb
):
    _, _, gate = node
    new = [*CLASSES, HOLD_WORD]
    try:
        set_classes(client, new)
        gate.wait_held(client)
        wait_for_change(client, lambda text: text == "encoding 1 texts")
        frames_with_the_old_vocabulary(client, rgb, gate)
        assert client.get_parameter("classes") == new  # accepted: what ros2 param get says
        gate.release(client)
        client.spin_until(lambda: latest_label_info(client) == new)
        labels, names = segment(client, rgb)
        assert names == new and int(labels.max()) < len(new)
        wait_for_change(client, lambda text: text == "applied")
        # label_info only ever told one whole vocabulary or the other.
        assert label_infos(client) == {tuple(CLASSES), tuple(new)}
    finally:
        restore(client)


def test_a_change_that_fails_after_encoding_a_while_is_put_back_and_frames_flowed(
    node, client, rgb
):
    process, gate = node[1], node[2]
    failing = ["cat", f"{HOLD_WORD} {TRIGGER_WORD}"]
    set_classes(client, failing)
    gate.wait_held(client)
    frames_with_the_old_vocabulary(client, rgb, gate)
    gate.release(client)
    status = wait_for_change(client, lambda text: text.startswith("classes: RuntimeError"))
    assert "previous settings in force" in status.message
    client.spin_until(lambda: client.get_parameter("classes") == CLASSES)
    _, names = segment(client, rgb)
    assert names == CLASSES
    assert label_infos(client) == {tuple(CLASSES)}
    assert "could not apply the change of classes" in process.output()


def test_a_newer_change_supersedes_one_still_encoding(node, client, rgb):
    _, _, gate = node
    try:
        set_classes(client, [f"{HOLD_WORD} again", "cat"])  # not cached by the tests above
        gate.wait_held(client)
        frames_with_the_old_vocabulary(client, rgb, gate, count=1)
        set_classes(client, ["bird", "sofa"])
        # The held encoding stops (it is superseded), without the test releasing it.
        client.spin_until(lambda: not gate.held.exists(), message="superseded encoding stopped")
        client.spin_until(lambda: latest_label_info(client) == ["bird", "sofa"])
        _, names = segment(client, rgb)
        assert names == ["bird", "sofa"]
        assert client.get_parameter("classes") == ["bird", "sofa"]
        wait_for_change(client, lambda text: text == "applied")
        assert label_infos(client) == {tuple(CLASSES), ("bird", "sofa")}
    finally:
        gate.release_file.unlink(missing_ok=True)
        restore(client)


def vocabularies_and_thresholds(client) -> set[tuple[tuple[str, ...], float]]:
    """Every (vocabulary, threshold) label_info told so far (since the last clear)."""
    messages = client.messages[client.topic("label_info")]
    return {
        (tuple(entry.class_name for entry in m.class_map), round(m.threshold, 3)) for m in messages
    }


def test_a_quick_change_accepted_while_a_slow_one_encodes_never_goes_in_force_before_it(
    node, client, rgb
):
    """Order of acceptance: a threshold accepted while a new vocabulary encodes is in force with
    it or after it, never with the old vocabulary (which the slow change's commit would then
    overwrite with the values it was prepared with)."""
    _, _, gate = node
    slow = [f"{HOLD_WORD} before a threshold", "cat"]
    try:
        message = make_image(rgb, "rgb8", next_header(client.node))
        old_threshold = round(
            client.wait_for_output(message, ("label_info",))["label_info"].threshold, 3
        )
        set_classes(client, slow)
        gate.wait_held(client)
        result = client.set_parameters([Parameter("score_threshold", value=0.25)])[0]
        assert result.successful, result.reason
        for _ in range(2):  # frames after the answer: the slow change is still encoding
            message = make_image(rgb, "rgb8", next_header(client.node))
            info = client.wait_for_output(message, ("label_info",))["label_info"]
            assert [e.class_name for e in info.class_map] == CLASSES
            assert round(info.threshold, 3) == old_threshold
        gate.release(client)
        client.spin_until(lambda: latest_label_info(client) == slow)
        client.spin_until(
            lambda: round(client.messages[client.topic("label_info")][-1].threshold, 3) == 0.25,
            message="label_info with the new threshold",
        )
        wait_for_change(client, lambda text: text == "applied")
        assert client.get_parameter("classes") == slow
        assert client.get_parameter("score_threshold") == pytest.approx(0.25)
        told = vocabularies_and_thresholds(client)
        assert (tuple(CLASSES), 0.25) not in told, told
        assert told <= {
            (tuple(CLASSES), old_threshold),
            (tuple(slow), old_threshold),
            (tuple(slow), 0.25),
        }, told
    finally:
        gate.release_file.unlink(missing_ok=True)
        result = client.set_parameters([Parameter("score_threshold", value=float(old_threshold))])
        assert result[0].successful
        restore(client)


def test_a_method_switch_while_a_vocabulary_encodes_goes_in_force_with_it_and_back(
    node, client, rgb
):
    """A method accepted while a vocabulary change encodes joins it (the vocabulary is then
    prepared for the new method): frames keep the old method and vocabulary until both swap in
    together; switching back while another vocabulary encodes does the same."""
    process, gate = node[1], node[2]
    notice = "method superpixel_clip (training-free)"
    steps = [
        ("superpixel_clip", [f"{HOLD_WORD} with a method", "cat"]),
        ("naclip", [f"{HOLD_WORD} and back", "dog"]),
    ]
    previous = CLASSES
    try:
        for method, classes in steps:
            logged = process.output().count(notice)
            set_classes(client, classes)
            gate.wait_held(client)
            holds = gate.holds()
            switched = client.set_parameters([Parameter("method", value=method)])[0]
            assert switched.successful, switched.reason
            # Superseded, and held again: the vocabulary prepared anew for the method.
            client.spin_until(lambda h=holds: gate.holds() > h, message="held again")
            gate.wait_held(client)
            _, names = segment(client, rgb)  # a frame while the change is prepared
            assert names == previous and gate.held.exists()
            assert process.output().count(notice) == logged  # nothing switched yet
            gate.release(client)
            client.spin_until(lambda c=classes: latest_label_info(client) == c)
            wait_for_change(client, lambda text: text == "applied")
            _, names = segment(client, rgb)
            assert names == classes
            assert client.get_parameter("method") == method
            assert client.get_parameter("classes") == classes
            previous = classes
        assert process.output().count(notice) == 1
    finally:
        gate.release_file.unlink(missing_ok=True)
        client.set_parameters([Parameter("method", value="naclip")])
        restore(client)


def set_atomically(client, changes: list[Parameter]):
    from rcl_interfaces.srv import SetParametersAtomically

    service = client.node.create_client(SetParametersAtomically, "/ovss/set_parameters_atomically")
    request = SetParametersAtomically.Request(parameters=[p.to_parameter_msg() for p in changes])
    return call_service(client.node, service, request).result


@pytest.mark.parametrize(
    "refused",
    [
        [Parameter("classes", value=["cat", "cat"])],  # refused by the node's validation
        [Parameter("score_threshold", value=5.0)],  # refused by the descriptor's range
        [Parameter("classes", value=["cow"]), Parameter("templates", value="no braces")],
    ],
    ids=["duplicate classes", "out of range", "one bad value of two"],
)
def test_a_refused_change_leaves_the_change_being_encoded_alone(node, client, rgb, refused):
    _, _, gate = node
    classes = [f"{HOLD_WORD} then refused {len(refused)} {refused[-1].name}", "cat"]  # new
    try:
        set_classes(client, classes)
        gate.wait_held(client)
        holds = gate.holds()
        result = set_atomically(client, refused)
        assert not result.successful and result.reason
        frames_with_the_old_vocabulary(client, rgb, gate, count=1)
        assert gate.holds() == holds  # not superseded: still the first hold
        gate.release(client)
        client.spin_until(lambda: latest_label_info(client) == classes)
        wait_for_change(client, lambda text: text == "applied")
        assert client.get_parameter("classes") == classes
    finally:
        gate.release_file.unlink(missing_ok=True)
        restore(client)


def test_shutdown_during_an_encoding_ends_the_node_at_once(node):
    """Last in this module: it ends the module's node (whose fixture then checks status 0)."""
    client, process, gate = node
    set_classes(client, [f"{HOLD_WORD} at shutdown"])
    gate.wait_held(client)
    start = time.monotonic()
    returncode = process.stop()
    took = time.monotonic() - start
    assert returncode == 0, process.output()
    # Ended by the stop, not by the gate giving up (it waits GATE_TIMEOUT_S).
    assert not gate.release_file.exists() and took < GATE_TIMEOUT_S / 5, took
    assert not gate.held.exists()
