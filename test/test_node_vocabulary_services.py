"""``~/set_vocabulary`` (ovss_interfaces) on the node and the managed node, over real DDS, the
node in its own process (``vocabulary_clients.serve``: under test/fault_injection_node.py, whose
text encoder holds a batch of prompts with ``HOLD_WORD`` until the test releases it, so that a
change can be kept in progress while the test races it). Checked: the answers (success, every
refusal with its reason), that the parameters show what the service set, that a parameter change
racing the service leaves one whole vocabulary in force, and the managed node's states (both
services). ``~/segment``: test_node_segment_service.py.
"""

from __future__ import annotations

import pytest
from fault_injection_node import HOLD_WORD, TRIGGER_WORD
from lifecycle_msgs.msg import Transition
from rclpy.parameter import Parameter
from ros_harness import Lifecycle, call_service
from vocabulary_clients import (
    LONG_PROMPT,
    STREAM,
    classes_parameter,
    in_force,
    label_names,
    photo,
    segment_request,
    serve,
    streamed_names,
    vocabulary_request,
    wait_answer,
)


@pytest.fixture(scope="module", params=["node", "lifecycle"])
def served(request, tmp_path_factory):
    """(OvssClient, VocabularyClients, fault dir, NodeProcess) of a running (active) node."""
    yield from serve(request.param, tmp_path_factory)


@pytest.fixture()
def node(served):
    """The served node with STREAM, single templates and no background words in force."""
    return in_force(served)


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
