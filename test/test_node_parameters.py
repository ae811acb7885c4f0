"""Parameter table, validation of whole configurations, and declaration on a real rclpy node."""

from __future__ import annotations

import array
from pathlib import Path

import pytest
import rclpy
import yaml
from rcl_interfaces.msg import ParameterType
from rclpy.exceptions import InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter
from ros_harness import isolate_dds

from ovss_ros import node_parameters
from ovss_ros.core import EngineConfig
from ovss_ros.node_parameters import ParameterError, validate, validate_update

CONFIG = Path(__file__).resolve().parents[1] / "config" / "ovss.yaml"


def test_defaults_are_valid_and_map_onto_engine_defaults():
    settings = validate(node_parameters.defaults())
    assert settings.engine == EngineConfig()
    assert [entry.name for entry in settings.classes] == list(node_parameters.DEFAULT_CLASSES)
    assert settings.image_transport == "raw"
    assert settings.cameras == ()  # the single camera of the plain contract
    assert settings.publish_masks and settings.publish_overlay and settings.publish_confidence


def test_config_file_holds_every_default():
    # "/**": the file applies to the node whatever its name or namespace.
    config = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]
    assert config == node_parameters.defaults()


def test_every_engine_field_is_a_parameter():
    assert set(node_parameters.ENGINE_FIELDS) <= set(node_parameters.SPECS)
    assert set(node_parameters.READ_ONLY) == {
        "model",
        "pretrained",
        "device",
        "precision",
        "image_transport",
        "cameras",
    }


def test_engine_config_from_values():
    values = node_parameters.defaults() | {
        "model": "/models/tiny.json",
        "method": "sclip",
        "background_words": ["sky", "wall"],
        "crop": 224,
        "stride": 112,
    }
    config = validate(values).engine
    assert config.model == "/models/tiny.json"
    assert config.method == "sclip"
    assert config.background_words == ("sky", "wall")
    assert (config.crop, config.stride) == (224, 112)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"classes": []}, "empty"),
        ({"classes": ["cat", "dog", "cat"]}, "duplicate"),
        ({"classes": ["Cat", "cat"]}, "duplicate"),
        ({"classes": ["wet floor", "wet-floor"]}, "duplicate"),
        ({"classes": [1, 2]}, "entry 0 is 1 \\(int\\)"),
        ({"classes": array.array("q", [1, 2])}, "list of strings"),
        ({"classes": "cat"}, "list of strings"),
        ({"classes": ["x" * 201]}, "too long"),
        ({"classes": ["cat", " ; "]}, "empty"),
        ({"method": "segformer"}, "method"),
        ({"refinement": "crf"}, "refinement"),
        ({"upsample": "nearest"}, "upsample"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
        ({"velocity_tau": 0.0}, "velocity_tau"),
        ({"freecp_ambiguity": 1.5}, "freecp_ambiguity"),
        ({"templates": "a photo"}, "templates"),
        ({"crop": 224, "stride": 300}, "stride"),
        ({"stride": 112}, "crop"),
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"short_side": -1}, "short_side"),
        ({"overlay_alpha": 2.0}, "overlay_alpha"),
        ({"max_frame_age": -1.0}, "max_frame_age"),
        ({"background_words": ["sky", "  "]}, "background_words"),
        ({"publish_masks": "yes"}, "publish_masks"),
    ],
)
def test_invalid_updates_are_refused_with_a_reason(changes, reason):
    with pytest.raises(ParameterError, match=reason):
        validate_update(node_parameters.defaults(), changes)


def test_camera_names_become_settings():
    values = node_parameters.defaults() | {"cameras": ["front", "rear_left", "_aux2"]}
    assert validate(values).cameras == ("front", "rear_left", "_aux2")


@pytest.mark.parametrize(
    ("cameras", "reason"),
    [
        (["front", ""], "entry 1 is empty"),
        (["front", "front"], "duplicate names \\['front'\\]"),
        (["front/left"], "'front/left' is not a valid ROS name token"),
        (["2nd"], "not starting with a digit"),
        (["rear cam"], "not a valid ROS name token"),
        (["a__b"], "not a valid ROS name token"),
        (["~front"], "not a valid ROS name token"),
        ([3], "list of strings"),
    ],
)
def test_invalid_camera_names_are_refused_with_a_reason(cameras, reason):
    with pytest.raises(ParameterError, match=reason):
        validate(node_parameters.defaults() | {"cameras": cameras})


def test_read_only_parameters_refuse_changes_but_accept_their_own_value():
    current = node_parameters.defaults()
    for name in node_parameters.READ_ONLY:
        with pytest.raises(ParameterError, match="read-only"):
            validate_update(current, {name: "something-else"})
        validate_update(current, {name: current[name]})


def test_unknown_parameter_is_refused():
    with pytest.raises(ParameterError, match="unknown parameter"):
        validate_update(node_parameters.defaults(), {"clases": ["cat"]})


def test_valid_update_returns_new_settings_and_leaves_current_alone():
    current = node_parameters.defaults()
    settings = validate_update(
        current, {"classes": ["tv; television; monitor", "person"], "score_threshold": 0.3}
    )
    assert [entry.name for entry in settings.classes] == ["tv", "person"]
    assert settings.classes[0].synonyms == ("tv", "television", "monitor")
    assert settings.engine.score_threshold == 0.3
    assert current == node_parameters.defaults()


def test_unset_background_words_mean_none():
    values = node_parameters.defaults() | {"background_words": None}
    assert validate(values).engine.background_words == ()


@pytest.fixture(scope="module")
def ros_context():
    isolate_dds()
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.shutdown(context=context)


def make_node(context, overrides=()):
    return Node("ovss", context=context, parameter_overrides=list(overrides))


def test_declared_parameters_have_types_ranges_and_read_only(ros_context):
    node = make_node(ros_context)
    try:
        values = node_parameters.declare_parameters(node)
        assert values == node_parameters.defaults()
        for spec in node_parameters.PARAMETERS:
            descriptor = node.describe_parameter(spec.name)
            assert descriptor.description
            assert descriptor.read_only == spec.read_only
        assert node.describe_parameter("classes").type == ParameterType.PARAMETER_STRING_ARRAY
        for name in ("background_words", "cameras"):
            assert node.describe_parameter(name).type == ParameterType.PARAMETER_STRING_ARRAY
        assert node.get_parameter("cameras").type_ == Parameter.Type.STRING_ARRAY
        assert node.describe_parameter("short_side").integer_range[0].to_value == 4096
        assert node.describe_parameter("score_threshold").floating_point_range[0].to_value == 1.0

        refused = node.set_parameters([Parameter("model", value="ViT-L-14")])[0]
        assert not refused.successful and "read-only" in refused.reason
        refused = node.set_parameters([Parameter("cameras", value=["front"])])[0]
        assert not refused.successful and "read-only" in refused.reason
        refused = node.set_parameters([Parameter("score_threshold", value=3.0)])[0]
        assert not refused.successful and "range" in refused.reason
        # String arrays are type-checked by validate() (a clearer reason than rclpy's).
        assert node.describe_parameter("classes").dynamic_typing
    finally:
        node.destroy_node()


def test_overrides_apply_at_declaration(ros_context):
    node = make_node(
        ros_context,
        [
            Parameter("classes", value=["cat", "dog"]),
            Parameter("background_words", value=["sky"]),
            Parameter("short_side", value=64),
            Parameter("cameras", value=["front", "rear"]),
        ],
    )
    try:
        values = node_parameters.declare_parameters(node)
        assert values["classes"] == ["cat", "dog"]
        assert validate(values).cameras == ("front", "rear")
        assert node.describe_parameter("cameras").read_only
        assert values["background_words"] == ["sky"]
        assert validate(values).engine.short_side == 64
    finally:
        node.destroy_node()


def test_out_of_range_override_fails_declaration(ros_context):
    node = make_node(ros_context, [Parameter("overlay_alpha", value=5.0)])
    try:
        with pytest.raises(InvalidParameterValueException):
            node_parameters.declare_parameters(node)
    finally:
        node.destroy_node()


def test_empty_string_array_is_a_typed_value_not_unset(ros_context):
    node = make_node(ros_context)
    try:
        node_parameters.declare_parameters(node)
        parameter = node.get_parameter("background_words")
        assert parameter.type_ == Parameter.Type.STRING_ARRAY
        assert parameter.value == []
    finally:
        node.destroy_node()
