"""Parameter changes over real DDS, the node in its own process (issue 7, items 1 and 5).

- Types as ROS users type them: an integer wherever a float is expected, at start-up (``-p``
  and ``--params-file``) and at runtime (SetParameters with an INTEGER), stored as the float;
  every other mismatch refused with the parameter's name, the type given and the type expected.
- Mask topics: a class whose resolved mask topic is longer than ROS allows is refused up front
  (the issue's namespace, deeper, and its 193-character class name).
- A change that passes validation but fails while being applied (text encoding out of memory,
  injected by test/fault_injection_node.py on the word ``oom_trigger``): the previous vocabulary
  and settings stay in force, label_info keeps matching the labels, /diagnostics says so, and
  the parameters are put back to the values in force (``ros2 param get`` tells the truth).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from fault_injection_node import TRIGGER_WORD, running_fault_node
from rcl_interfaces.msg import ParameterType
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    image_array,
    make_image,
    next_header,
    published_topics,
    status_values,
)

from ovss_ros.ros import parameters as node_parameters

# The namespace, deeper: room for a mask slug of exactly ROOM characters (and for the
# node's own service names: Fast DDS refuses "rq/<service>Request" above 255 characters).
ROOM = 30
NAMESPACE = "/warehouse_robot_07/perception/front_left_camera/segmentation/"
NAMESPACE += "n" * (247 - len("/ovss/masks/") - ROOM - len(NAMESPACE))
NODE = f"{NAMESPACE}/ovss"
STATUS = "ovss: image"
CLASSES = ["cat", "dog", "person"]
FLOATS = [spec.name for spec in node_parameters.PARAMETERS if isinstance(spec.default, float)]
# Integers for every float at start-up: half from a params file, half from -p.
FROM_FILE = {
    "dslo.sinkhorn_epsilon": 1,
    "dslo.velocity_tau": 1,
    "freecp.redundancy": 0,
    "dense.area_threshold": 0,
}
FROM_FILE["dslo.sd.temperature"] = 2
# pnp_ovss, deop, twostream (issues 9, 10)
FROM_FILE |= {"pnp.threshold": 0, "pnp.blur": 0, "deop.logit_scale": 100}
FROM_FILE["depth.slop"] = 1  # labels in 3D
FROM_COMMAND_LINE = {
    "freecp.ambiguity": 1,
    "score_threshold": 0,
    "dense.logit_scale": 40,
    "overlay_alpha": 1,
    "max_frame_age": 60,
    # pnp_ovss, deop, twostream (issues 9, 10)
    "pnp.presence_threshold": 1,
    "deop.superpixel_compactness": 10,
    "deop.severance_residual": 0,
    "superpixel_clip.severance_residual": 1,  # issue 21
}

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    assert sorted(FROM_FILE | FROM_COMMAND_LINE) == sorted(FLOATS)
    folder = tmp_path_factory.mktemp("parameter_changes")
    params = folder / "ovss.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": FROM_FILE}}))
    parameters = TINY_NODE_PARAMETERS | {"classes": CLASSES} | FROM_COMMAND_LINE
    extra = ["-r", f"__ns:={NAMESPACE}", "--params-file", str(params)]
    with running_fault_node(
        parameters, folder, extra, node_namespace=NODE, input_namespace=NAMESPACE
    ) as (client, process):
        yield client, process


def set_one(client, parameter: Parameter):
    return client.set_parameters([parameter])[0]


def latest_label_info(client):
    messages = client.messages[client.topic("label_info")]
    return [entry.class_name for entry in messages[-1].class_map] if messages else None


def wait_for_vocabulary(client, names: list[str]) -> None:
    client.spin_until(
        lambda: latest_label_info(client) == names, message=lambda: f"label_info with {names}"
    )


@pytest.fixture(scope="module")
def rgb(voc_rgb) -> np.ndarray:
    return np.ascontiguousarray(voc_rgb[1][:96, :128])


def segment(client, rgb):
    """Labels and label_info of one frame, matched by its header."""
    message = make_image(rgb, "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "label_info"))
    names = [entry.class_name for entry in out["label_info"].class_map]
    return image_array(out["labels"]), names


# Item 5: types.


def test_integers_given_at_start_up_are_stored_as_floats(client):
    for name, given in (FROM_FILE | FROM_COMMAND_LINE).items():
        value = client.get_parameter(name)
        assert type(value) is float and value == float(given), name
        assert client.describe_parameter(name).type == ParameterType.PARAMETER_DOUBLE, name


def test_an_integer_is_accepted_at_runtime_for_every_float(client):
    try:
        for name in FLOATS:
            result = set_one(client, Parameter(name, value=1))  # an INTEGER on the wire
            assert result.successful, f"{name}: {result.reason}"
            value = client.get_parameter(name)
            assert type(value) is float and value == 1.0, name
            assert client.describe_parameter(name).type == ParameterType.PARAMETER_DOUBLE, name
    finally:
        for name, given in (FROM_FILE | FROM_COMMAND_LINE).items():
            assert set_one(client, Parameter(name, value=float(given))).successful


@pytest.mark.parametrize(
    ("parameter", "reason"),
    [
        (
            Parameter("overlay_alpha", value="abc"),
            "overlay_alpha must be a floating-point number, got string 'abc'",
        ),
        (
            Parameter("score_threshold", value=True),
            "score_threshold must be a floating-point number, got boolean True",
        ),
        (
            Parameter("publish_masks", value=1),
            "publish_masks must be a boolean (true or false), got integer 1",
        ),
        (Parameter("short_side", value=64.5), "short_side must be an integer, got floating-point"),
        (Parameter("templates", value=3), "templates must be a string, got integer 3"),
        (
            Parameter("classes", value="cat"),
            "classes must be a list of strings (e.g. ['cat', 'dog']), got string 'cat'",
        ),
        (
            Parameter("background_words", value=[1, 2]),
            "background_words must be a list of strings (e.g. ['cat', 'dog']), got list of "
            "integers [1, 2]",
        ),
        (Parameter("classes", Parameter.Type.NOT_SET), "classes cannot be unset"),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_a_refusal_names_the_parameter_the_type_given_and_the_type_expected(
    client, parameter, reason
):
    before = client.get_parameter(parameter.name)
    result = set_one(client, parameter)
    assert not result.successful and reason in result.reason, result.reason
    assert client.get_parameter(parameter.name) == before
    # The descriptor still tells the type the parameter has (rclpy overwrites it on the way).
    spec = node_parameters.SPECS[parameter.name]
    assert client.describe_parameter(parameter.name).type == spec.type.value


def test_an_empty_list_is_stored_as_an_empty_list_of_strings(client):
    result = set_one(client, Parameter("background_words", Parameter.Type.BYTE_ARRAY, []))
    assert result.successful, result.reason
    assert client.get_parameter("background_words") == []
    assert (
        client.describe_parameter("background_words").type == ParameterType.PARAMETER_STRING_ARRAY
    )


# Item 1: mask topics.


def test_a_class_whose_mask_topic_is_too_long_is_refused_and_one_that_fits_is_not(client, rgb):
    long_name = "a very long class name " * 8 + "x" * 9  # the 193 characters
    for refused in (long_name, "f" * (ROOM + 1)):
        result = set_one(client, Parameter("classes", value=["cat", refused]))
        assert not result.successful
        assert f"entry 1 {refused[:20]!r}"[:-1] in result.reason
        assert "characters long, more than the 247 that ROS allows" in result.reason
        assert client.get_parameter("classes") == CLASSES
    assert "248 characters long" in result.reason
    # Exactly as long as ROS allows: accepted, with its mask topic.
    fits = "f" * ROOM
    try:
        assert set_one(client, Parameter("classes", value=["cat", fits])).successful
        wait_for_vocabulary(client, ["cat", fits])
        topic = f"{NODE}/masks/{fits}"
        assert len(topic) == 247
        client.spin_until(lambda: topic in published_topics(client.node, f"{NODE}/masks/"))
        labels, names = segment(client, rgb)
        assert names == ["cat", fits]
    finally:
        assert set_one(client, Parameter("classes", value=CLASSES)).successful
        wait_for_vocabulary(client, CLASSES)


# Item 1: a change that fails while being applied.


def wait_for_change(client, predicate):
    return client.wait_for_status(STATUS, lambda values: predicate(values["parameter change"]))


def test_a_vocabulary_that_fails_to_encode_leaves_the_old_one_in_force(client, node, rgb):
    _, process = node
    before_labels, before_names = segment(client, rgb)
    assert before_names == CLASSES
    failing = ["cat", f"{TRIGGER_WORD} chair", "sofa"]
    # Nothing in it can be foreseen: accepted, then encoding fails in the worker.
    assert set_one(client, Parameter("classes", value=failing)).successful
    status = wait_for_change(client, lambda text: text.startswith("classes: RuntimeError"))
    assert status.level == bytes([1])  # WARN
    assert "parameter change failed: classes: RuntimeError: CUDA out of memory" in status.message
    assert "previous settings in force" in status_values(status)["parameter change"]
    # ros2 param get tells what is in force.
    client.spin_until(lambda: client.get_parameter("classes") == CLASSES)
    # label_info and the labels: the old vocabulary, the very labels it computed before.
    assert latest_label_info(client) == CLASSES
    labels, names = segment(client, rgb)
    assert names == CLASSES
    np.testing.assert_array_equal(labels, before_labels)
    errors = [line for line in process.output().splitlines() if "[ERROR]" in line]
    assert any("could not apply the change of classes" in line for line in errors), errors
    # The next change that works is applied and clears the warning.
    try:
        assert set_one(client, Parameter("classes", value=["cat", "sofa"])).successful
        wait_for_vocabulary(client, ["cat", "sofa"])
        status = wait_for_change(client, lambda text: text == "applied")
        # The change's warning is gone (a silent-input WARN may remain: this client sends
        # frames only when a test asks).
        assert "parameter change failed" not in status.message, status.message
        assert status.level == bytes([0]) or "no frame on" in status.message, status.message
    finally:
        assert set_one(client, Parameter("classes", value=CLASSES)).successful
        wait_for_vocabulary(client, CLASSES)


@pytest.mark.parametrize(
    "parameter",
    [
        Parameter("templates", value=f"a photo of a {{}}.|a {{}} next to an {TRIGGER_WORD}."),
        Parameter("background_words", value=["sky", TRIGGER_WORD]),
    ],
    ids=lambda value: value.name,
)
def test_an_engine_change_that_fails_leaves_the_old_settings_in_force(client, rgb, parameter):
    before = client.get_parameter(parameter.name)
    before_labels, _ = segment(client, rgb)
    assert set_one(client, parameter).successful
    wait_for_change(client, lambda text: text.startswith(f"{parameter.name}: RuntimeError"))
    client.spin_until(lambda: client.get_parameter(parameter.name) == before)
    labels, names = segment(client, rgb)
    assert names == CLASSES
    np.testing.assert_array_equal(labels, before_labels)


def test_one_request_is_applied_whole_or_not_at_all(client, rgb):
    """Classes, templates and a node setting in one atomic request; the templates fail: none
    of it is in force, and every parameter shows the value in force again."""
    from rcl_interfaces.srv import SetParametersAtomically
    from ros_harness import call_service

    before = {
        name: client.get_parameter(name) for name in ("classes", "templates", "publish_confidence")
    }
    before_labels, _ = segment(client, rgb)
    request = SetParametersAtomically.Request(
        parameters=[
            Parameter("classes", value=["cat", "sofa"]).to_parameter_msg(),
            Parameter("templates", value=f"a {{}} {TRIGGER_WORD}").to_parameter_msg(),
            Parameter("publish_confidence", value=False).to_parameter_msg(),
        ]
    )
    atomic = client.node.create_client(
        SetParametersAtomically, f"{NODE}/set_parameters_atomically"
    )
    assert call_service(client.node, atomic, request).result.successful
    wait_for_change(client, lambda text: "RuntimeError" in text)
    client.spin_until(
        lambda: {name: client.get_parameter(name) for name in before} == before,
        message="parameters put back",
    )
    message = make_image(rgb, "rgb8", next_header(client.node))
    out = client.wait_for_output(message, ("labels", "label_info", "confidence"))
    assert [entry.class_name for entry in out["label_info"].class_map] == CLASSES
    np.testing.assert_array_equal(image_array(out["labels"]), before_labels)


# Item 1: everything the worker would fail on is refused up front, with the reason.


@pytest.mark.parametrize(
    ("parameter", "reason"),
    [
        (
            Parameter("templates", value="a photo of a {} in the {room}."),
            "bad template 'a photo of a {} in the {room}.': it has 2 fields",
        ),
        (Parameter("templates", value="a {} of {}"), "bad template 'a {} of {}': it has 2 fields"),
        (
            Parameter("background_words", value=[f"word {index}" for index in range(5000)]),
            "background_words: too many words: 5000 > 1000",
        ),
        (
            Parameter("classes", value=[f"c{i}; s{i}; t{i}" for i in range(700)]),
            "too many text queries: 2100",
        ),
        (
            Parameter("classes", value=["cat", "chair\n[ERROR] [ovss]: forged"]),
            "class entry 1 'chair\\n[ERROR] [ovss]: forged' contains U+000A (control character)",
        ),
    ],
    ids=[
        "template with a named field",
        "template with two fields",
        "5000 background words",
        "2100 text queries",
        "newline in a class",
    ],
)
def test_what_would_fail_in_the_worker_is_refused_up_front(client, node, parameter, reason):
    _, process = node
    before = client.get_parameter(parameter.name)
    result = set_one(client, parameter)
    assert not result.successful and reason in result.reason, result.reason
    assert client.get_parameter(parameter.name) == before
    assert "forged" not in "".join(
        line for line in process.output().splitlines() if line.startswith("[ERROR]")
    )


# Item 2, node side: names in any language, ASCII mask topics that cannot collide.


def test_class_names_in_any_language_get_their_own_mask_topics(client, node, rgb):
    _, process = node
    names = ["椅子; chair", "кошка", "café", "caf", "straße"]
    expected = ["椅子", "кошка", "café", "caf", "straße"]
    try:
        result = set_one(client, Parameter("classes", value=names))
        assert result.successful, result.reason
        wait_for_vocabulary(client, expected)  # label_info: the names as written
        slugs = [entry.slug for entry in node_parameters.parse_classes(names)]
        assert len(set(slugs)) == 5 and all(slug.isascii() for slug in slugs)
        topics = {f"{NODE}/masks/{slug}" for slug in slugs}
        client.spin_until(lambda: topics <= published_topics(client.node, f"{NODE}/masks/"))
        _, label_names = segment(client, rgb)
        assert label_names == expected
        client.spin_until(lambda: "vocabulary: '椅子', 'кошка', 'café'" in process.output())
    finally:
        assert set_one(client, Parameter("classes", value=CLASSES)).successful
        wait_for_vocabulary(client, CLASSES)
