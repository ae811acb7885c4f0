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

from ovss_ros.core import EngineConfig, parse_classes
from ovss_ros.core.config import RENAMED
from ovss_ros.ros import parameter_docs, topic_names, undeclared
from ovss_ros.ros import parameters as node_parameters
from ovss_ros.ros.launch_plan import flatten_parameters
from ovss_ros.ros.parameters import ParameterError, validate, validate_update

CONFIG = Path(__file__).resolve().parents[1] / "config" / "ovss.yaml"


def test_defaults_are_valid_and_map_onto_engine_defaults():
    settings = validate(node_parameters.defaults())
    assert settings.engine == EngineConfig()
    assert [entry.name for entry in settings.classes] == list(node_parameters.DEFAULT_CLASSES)
    assert settings.image_transport == "raw"
    assert settings.cameras == ()  # the single camera of the plain contract
    assert settings.publish_masks and settings.publish_overlay and settings.publish_confidence


def test_config_file_holds_every_default():
    # "/**": the file applies to the node whatever its name or namespace; a method's
    # parameters nested by namespace (dslo: sd: size), as rcl reads dslo.sd.size.
    config = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]
    assert flatten_parameters(config) == node_parameters.defaults()
    assert config["dslo"]["sd"]["size"] == 512 and config["pnp"]["layer"] == 8
    assert not set(config) & set(RENAMED)


def test_config_file_is_the_one_the_settings_make():
    """config/ovss.yaml, comments included, is made from the settings' definitions (python -m
    ovss_ros.ros.parameter_docs --write remakes it after a setting changes)."""
    assert CONFIG.read_text() == parameter_docs.params_yaml()


def test_the_table_is_the_engines_schema_and_the_node_settings():
    """One definition: every engine setting (core.config.SCHEMA) and every node setting is a
    parameter with the definition's default, description, range and runtime flag."""
    from ovss_ros.core.config import SCHEMA
    from ovss_ros.ros.node_settings import NODE_SCHEMA

    definitions = {d.name: d for d in (*SCHEMA, *NODE_SCHEMA)}
    assert set(definitions) == set(node_parameters.SPECS)
    for name, spec in node_parameters.SPECS.items():
        definition = definitions[name]
        default = definition.default
        assert spec.default == (list(default) if isinstance(default, tuple) else default)
        assert spec.description == definition.info.description
        assert spec.read_only == (not definition.info.runtime)
        assert (spec.minimum, spec.maximum) == (definition.info.minimum, definition.info.maximum)
        for choice in definition.info.choices:
            assert choice in spec.constraints, name


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_flat_name_is_refused_with_its_new_name(old):
    with pytest.raises(ParameterError) as refused:
        validate_update(
            node_parameters.defaults(), {old: node_parameters.defaults()[RENAMED[old]]}
        )
    assert str(refused.value) == f"{old} was renamed {RENAMED[old]}"


def test_every_engine_field_is_a_parameter():
    assert set(node_parameters.ENGINE_FIELDS) <= set(node_parameters.SPECS)
    assert set(node_parameters.READ_ONLY) == {
        "model",
        "pretrained",
        "device",
        "precision",
        "image_transport",
        "cameras",
        "depth.enabled",
        "depth.queue_size",
        "pnp.vlm_model",
        "pnp.vlm_pretrained",
    }


def test_the_engine_bounds_are_parameters_with_the_engines_defaults():
    """Issue 7, item 3: max_long_side (the engine's) and max_input_pixels (the conversion's)."""
    from ovss_ros.core.config import MAX_LONG_SIDE_LIMIT
    from ovss_ros.ros.image_conversion import DEFAULT_MAX_INPUT_PIXELS

    defaults = node_parameters.defaults()
    assert defaults["max_long_side"] == EngineConfig().max_long_side == 2048
    assert defaults["max_input_pixels"] == DEFAULT_MAX_INPUT_PIXELS == 40_000_000
    settings = validate(defaults | {"max_long_side": 1024, "max_input_pixels": 640 * 480})
    assert settings.engine.max_long_side == 1024 and settings.max_input_pixels == 307200
    assert "max_long_side" in node_parameters.RUNTIME_ENGINE_FIELDS
    with pytest.raises(ParameterError, match="max_long_side must be in"):
        validate(defaults | {"max_long_side": MAX_LONG_SIDE_LIMIT + 1})


def test_engine_config_from_values():
    values = node_parameters.defaults() | {
        "model": "/models/tiny.json",
        "method": "sclip",
        "background_words": ["sky", "wall"],
        "dense.crop": 224,
        "dense.stride": 112,
    }
    config = validate(values).engine
    assert config.model == "/models/tiny.json"
    assert config.method == "sclip"
    assert config.background_words == ("sky", "wall")
    assert (config.dense.crop, config.dense.stride) == (224, 112)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"classes": []}, "empty"),
        ({"classes": ["cat", "dog", "cat"]}, "duplicate"),
        ({"classes": ["Cat", "cat"]}, "duplicate"),
        ({"classes": [1, 2]}, "got list of integers \\[1, 2\\]"),
        ({"classes": ["cat", 2]}, "entry 1 is integer 2"),
        ({"classes": array.array("q", [1, 2])}, "list of strings"),
        ({"classes": "cat"}, "list of strings"),
        ({"classes": ["x" * 201]}, "too long"),
        ({"classes": ["cat", " ; "]}, "empty"),
        ({"method": "segformer"}, "method"),
        # choices come from the settings' definitions, the node's own ones too
        ({"dslo.mode": "fast"}, r"unknown dslo.mode 'fast': use one of \['ot', 'velocity'\]"),
        ({"refinement": "crf"}, "refinement"),
        ({"dense.upsample": "nearest"}, "dense.upsample"),
        ({"dslo.sinkhorn_iterations": 0}, "dslo.sinkhorn_iterations"),
        ({"dslo.velocity_tau": 0.0}, "dslo.velocity_tau"),
        ({"freecp.ambiguity": 1.5}, "freecp.ambiguity"),
        ({"templates": "a photo"}, "templates"),
        ({"dense.crop": 224, "dense.stride": 300}, "dense.stride"),
        ({"dense.stride": 112}, "dense.crop"),
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"dense.logit_scale": 0.0}, "dense.logit_scale"),
        ({"short_side": -1}, "short_side"),
        ({"overlay_alpha": 2.0}, "overlay_alpha"),
        ({"max_frame_age": -1.0}, "max_frame_age"),
        ({"background_words": ["sky", "  "]}, "background_words"),
        ({"publish_masks": "yes"}, "publish_masks"),
        ({"max_input_pixels": 0}, "max_input_pixels must be in"),
        ({"max_long_side": 0}, "max_long_side must be in"),
        ({"dslo.affinity": "dino"}, "unknown dslo.affinity 'dino'"),
        ({"dslo.sd.model": "  "}, "dslo.sd.model must name a Stable Diffusion model"),
        ({"dslo.sd.precision": "fp8"}, "unknown dslo.sd.precision 'fp8'"),
        ({"dslo.sd.size": 32}, r"dslo.sd.size must be in \[64, 1448\]"),
        # issue 18: sizes whose frame needs a map beyond the per-frame budget, with the cost
        (
            {"dslo.sd.size": 2048},
            "dslo.sd.size 2048 needs a 2.15 GB VAE activation per frame; at most 1448",
        ),
        (
            {"dslo.sd.size": 4096},
            "dslo.sd.size 4096 needs a 8.59 GB VAE activation per frame; at most 1448",
        ),
        ({"pnp.image_size": 1024}, "pnp.image_size 1024 needs a 1.07 GB attention map per frame"),
        ({"pnp.image_size": 4096}, "pnp.image_size 4096 needs a 274.9 GB attention map"),
        ({"twostream.crop_batch": 1024}, "twostream.crop_batch 1024 needs a 2.48 GB CLIP"),
        # a seen-class list is refused as the vocabulary's names are: blank, too long, too many
        ({"twostream.seen_classes": ["cat", " "]}, "twostream.seen_classes entry 1 is blank"),
        ({"twostream.seen_classes": [""]}, "twostream.seen_classes entry 0 is blank"),
        ({"twostream.seen_classes": ["x" * 201]}, "entry 0 has 201 characters, at most 200"),
        ({"twostream.seen_classes": [f"c{i}" for i in range(1001)]}, "1001 names, at most 1000"),
        (
            {"refinement": "dslo", "short_side": 4096, "max_long_side": 4096},
            "256x256 patches, whose patch affinity needs a 17.2 GB map per frame",
        ),
        (
            {"refinement": "freecp", "short_side": 0, "max_long_side": 4096},
            "whose patch affinity needs a 17.2 GB map",
        ),
        ({"dense.logit_scale": float("inf")}, r"dense.logit_scale must be in"),
        ({"dense.crop": 5000}, r"dense.crop must be in \[0, 4096\]"),
        ({"dslo.sd.timestep": 1000}, r"dslo.sd.timestep must be in \[0, 999\]"),
        ({"dslo.sd.temperature": 0.0}, "dslo.sd.temperature must be in"),
        ({"dslo.sd.layers": "mid"}, "unknown dslo.sd.layers 'mid'"),
        ({"dslo.sd.noise": 1}, "dslo.sd.noise must be a boolean"),
        ({"dslo.sd.seed": -1}, "dslo.sd.seed must be in"),
    ],
)
def test_invalid_updates_are_refused_with_a_reason(changes, reason):
    with pytest.raises(ParameterError, match=reason):
        validate_update(node_parameters.defaults(), changes)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("image_transport", "theora", "unknown image_transport 'theora': use one of ['raw', "),
        ("precision", "fp8", "unknown precision 'fp8': use one of ['fp32', 'fp16', 'bf16']"),
        ("pnp.vlm_model", "llava", "unknown pnp.vlm_model 'llava': use one of ['blip_itm']"),
    ],
)
def test_a_start_up_choice_is_refused_with_the_choices(name, value, reason):
    with pytest.raises(ParameterError) as refused:
        validate(node_parameters.defaults() | {name: value})
    assert reason in str(refused.value)


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


# Item 5 of issue 7: parameters as ROS users type them.
FLOATS = [spec.name for spec in node_parameters.PARAMETERS if isinstance(spec.default, float)]


def test_the_float_parameters_are_found():
    # If this changes, the tests below cover the new ones too (they use FLOATS).
    assert FLOATS == [
        "score_threshold",
        "overlay_alpha",
        "max_frame_age",
        "depth.slop",
        "dense.logit_scale",
        "dense.area_threshold",
        "dslo.sinkhorn_epsilon",
        "dslo.velocity_tau",
        "dslo.sd.temperature",
        "freecp.redundancy",
        "freecp.ambiguity",
        "pnp.threshold",  # pnp_ovss, deop, twostream (issues 9, 10)
        "pnp.presence_threshold",
        "pnp.blur",
        "deop.logit_scale",
        "deop.superpixel_compactness",
        "deop.severance_residual",
        "superpixel_clip.severance_residual",  # issue 21
    ]


@pytest.mark.parametrize("name", FLOATS)
def test_an_integer_is_accepted_for_every_float_and_means_that_float(name):
    settings = validate_update(node_parameters.defaults(), {name: 1})
    value = getattr(settings, name, None)
    if value is None and name.startswith("depth."):  # the node's depth settings
        value = getattr(settings.depth, name.removeprefix("depth."))
    if value is None:
        value = settings.engine.flat()[name]
    assert value == 1.0 and type(value) is float


@pytest.mark.parametrize("name", FLOATS)
def test_coerce_turns_an_integer_into_the_float(name):
    (parameter,) = node_parameters.coerce([Parameter(name, value=1)])
    assert parameter.type_ == Parameter.Type.DOUBLE and parameter.value == 1.0


def test_coerce_leaves_everything_else_to_validation():
    given = [
        Parameter("overlay_alpha", value="abc"),
        Parameter("overlay_alpha", value=True),
        Parameter("short_side", value=64),
        Parameter("short_side", value=2.5),
        Parameter("publish_masks", value=1),
        Parameter("classes", value=["cat"]),
        Parameter("classes", value="cat"),
        Parameter("use_sim_time", value=1),  # not ours
    ]
    assert [(p.type_, p.value) for p in node_parameters.coerce(given)] == [
        (p.type_, p.value) for p in given
    ]


@pytest.mark.parametrize(
    "kind",
    [
        Parameter.Type.BYTE_ARRAY,  # what rclpy makes of []
        Parameter.Type.INTEGER_ARRAY,
        Parameter.Type.DOUBLE_ARRAY,
        Parameter.Type.BOOL_ARRAY,
    ],
)
def test_coerce_types_an_empty_list_as_the_string_array_it_means(kind):
    (parameter,) = node_parameters.coerce([Parameter("background_words", kind, [])])
    assert parameter.type_ == Parameter.Type.STRING_ARRAY and parameter.value == []


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (
            "overlay_alpha",
            "abc",
            "overlay_alpha must be a floating-point number, got string 'abc'",
        ),
        ("score_threshold", True, "must be a floating-point number, got boolean True"),
        (
            "dense.logit_scale",
            None,
            "dense.logit_scale must be a floating-point number, got nothing (unset)",
        ),
        (
            "overlay_alpha",
            array.array("d", [0.5]),
            "must be a floating-point number, got list of floating-point numbers [0.5]",
        ),
        ("short_side", 2.5, "short_side must be an integer, got floating-point number 2.5"),
        ("dense.crop", False, "dense.crop must be an integer, got boolean False"),
        ("dslo.sinkhorn_iterations", "50", "must be an integer, got string '50'"),
        ("publish_masks", 1, "publish_masks must be a boolean (true or false), got integer 1"),
        ("dense.pamr", "yes", "dense.pamr must be a boolean (true or false), got string 'yes'"),
        ("method", 3, "method must be a string, got integer 3"),
        ("templates", ["a {}"], "templates must be a string, got list of strings ['a {}']"),
        ("classes", "cat", "classes must be a list of strings (e.g. ['cat', 'dog']), got string"),
        ("background_words", array.array("q", [1, 2]), "got list of integers [1, 2]"),
        ("background_words", [True], "got list of booleans [True]"),
        ("background_words", ["sky", 5], "entry 1 is integer 5"),
        ("classes", 7, "classes must be a list of strings (e.g. ['cat', 'dog']), got integer 7"),
    ],
)
def test_a_refusal_names_the_parameter_the_type_given_and_the_type_expected(name, value, reason):
    with pytest.raises(ParameterError) as refused:
        validate_update(node_parameters.defaults(), {name: value})
    assert reason in str(refused.value)


def test_a_long_or_control_character_value_is_quoted_safely_in_a_refusal():
    with pytest.raises(ParameterError) as refused:
        validate_update(node_parameters.defaults(), {"overlay_alpha": "x\n[ERROR] forged" * 20})
    text = str(refused.value)
    assert "\n" not in text and "\\n" in text  # escaped, one line
    assert len(text) < 200 and text.endswith("...")


def test_integer_overrides_of_every_float_are_declared_as_floats(ros_context):
    node = make_node(ros_context, [Parameter(name, value=1) for name in FLOATS])
    try:
        values = node_parameters.declare_parameters(node)
        for name in FLOATS:
            assert values[name] == 1.0 and type(values[name]) is float, name
            parameter = node.get_parameter(name)
            assert parameter.type_ == Parameter.Type.DOUBLE and parameter.value == 1.0, name
            assert node.describe_parameter(name).type == ParameterType.PARAMETER_DOUBLE, name
        validate(values)
    finally:
        node.destroy_node()


def test_an_integer_override_out_of_range_is_refused_with_the_range(ros_context):
    node = make_node(ros_context, [Parameter("overlay_alpha", value=5)])
    try:
        with pytest.raises(ParameterError, match=r"overlay_alpha must be in \[0.0, 1.0\], got 5"):
            node_parameters.declare_parameters(node)
    finally:
        node.destroy_node()


def node_from_arguments(arguments: list[str]):
    """A node whose overrides come from command-line arguments, parsed by rcl (as at start-up)."""
    isolate_dds()
    context = rclpy.Context()
    rclpy.init(context=context, args=["ovss", "--ros-args", *arguments])
    return context, Node("ovss", context=context)


@pytest.mark.parametrize("path", ["-p", "--params-file"])
def test_integers_for_floats_at_start_up_from_the_command_line_and_a_params_file(tmp_path, path):
    integers = {name: 1 for name in FLOATS}
    if path == "-p":
        arguments = [arg for name in FLOATS for arg in ("-p", f"{name}:=1")]
    else:
        params = tmp_path / "ovss.yaml"
        params.write_text(yaml.safe_dump({"/**": {"ros__parameters": integers}}))
        assert "overlay_alpha: 1\n" in params.read_text()  # an integer in the YAML
        arguments = ["--params-file", str(params)]
    context, node = node_from_arguments(arguments)
    try:
        values = node_parameters.declare_parameters(node)
        for name in FLOATS:
            assert values[name] == 1.0 and type(values[name]) is float, name
            assert node.get_parameter(name).type_ == Parameter.Type.DOUBLE, name
        assert validate(values).overlay_alpha == 1.0
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("overlay_alpha:=abc", "overlay_alpha must be a floating-point number, got string 'abc'"),
        ("publish_masks:=1", "publish_masks must be a boolean (true or false), got integer 1"),
        ("short_side:=64.5", "short_side must be an integer, got floating-point number 64.5"),
        ("classes:=cat", "classes must be a list of strings (e.g. ['cat', 'dog']), got string"),
        ("background_words:=[1, 2]", "got list of integers [1, 2]"),
    ],
)
def test_a_wrong_type_at_start_up_is_refused_with_names_and_types(argument, reason):
    context, node = node_from_arguments(["-p", argument])
    try:
        values = node_parameters.declare_parameters(node)
        with pytest.raises(ParameterError) as refused:
            validate(values)
        assert reason in str(refused.value)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


# Mask topics (issue 7, item 1): resolved as the node resolves them, checked by ROS's rules.
ISSUE_NAMESPACE = "/warehouse_robot_07/perception/front_left_camera"
LONG_CLASS = "a very long class name " * 8 + "x" * 9  # the issue's 193 characters


def mask_topic_length(namespace: str, slug: str, camera: str = "") -> int:
    """Computed independently of the code under test: <ns>/ovss/[<camera>/]masks/<slug>."""
    return len(f"{namespace}/ovss/{camera + '/' if camera else ''}masks/{slug}")


def test_the_issues_long_class_gets_a_mask_topic_or_a_reason(ros_context):
    """The issue's example. Its right value depends on the slug the vocabulary gives the class:
    a slug that makes the topic longer than ROS allows is refused with the length, a shorter
    one (a slug cut with a hash suffix) is accepted and the topic fits."""
    assert len(LONG_CLASS) == 193
    node = Node("ovss", namespace=ISSUE_NAMESPACE, context=ros_context)
    try:
        classes = parse_classes(["cat", LONG_CLASS])
        length = mask_topic_length(ISSUE_NAMESPACE, classes[1].slug)
        if length > node_parameters.TOPIC_MAX_LENGTH:
            with pytest.raises(ParameterError) as refused:
                node_parameters.check_mask_topics(classes, ["~/"], node.resolve_topic_name)
            reason = str(refused.value)
            assert reason.startswith("classes: entry 1 'a very long class name")
            assert f"would be {length} characters long, more than the 247" in reason
        else:
            node_parameters.check_mask_topics(classes, ["~/"], node.resolve_topic_name)
            assert len(node.resolve_topic_name(f"~/masks/{classes[1].slug}")) == length
    finally:
        node.destroy_node()


def test_mask_topics_longer_than_ros_allows_are_refused(ros_context):
    """A namespace that leaves room for 'cat' but is one character short for the long class."""
    classes = parse_classes(["cat", LONG_CLASS])
    slug = classes[1].slug
    assert len(slug) > 10
    width = node_parameters.TOPIC_MAX_LENGTH + 1 - mask_topic_length("", slug)
    namespace = "/robot_" + "n" * (width - len("/robot_"))
    assert mask_topic_length(namespace, slug) == 248
    node = Node("ovss", namespace=namespace, context=ros_context)
    try:
        resolve = node.resolve_topic_name
        node_parameters.check_mask_topics(classes[:1], ["~/", "~/front/"], resolve)
        with pytest.raises(ParameterError) as refused:
            node_parameters.check_mask_topics(classes, ["~/"], resolve)
        reason = str(refused.value)
        assert reason.startswith("classes: entry 1 'a very long class name")
        assert "would be 248 characters long, more than the 247 that ROS allows" in reason
        assert "shorten the class name (its first synonym) or the node's namespace" in reason
        # A camera's topics are longer by its name: the last class that fits alone does not.
        fits = parse_classes(["c" * (len(slug) - 1)])
        if len(fits[0].slug) == len(slug) - 1:  # a readable slug (no hash suffix)
            node_parameters.check_mask_topics(fits, ["~/"], resolve)
            with pytest.raises(ParameterError, match="entry 0 .* 253 characters"):
                node_parameters.check_mask_topics(fits, ["~/front/"], resolve)
    finally:
        node.destroy_node()


def test_a_mask_topic_rcl_cannot_resolve_is_refused_with_rcls_reason(ros_context):
    node = Node("ovss", context=ros_context)
    try:
        entry = parse_classes(["cat"])[0]
        problem = topic_names._topic_problem("~/masks/bad name", node.resolve_topic_name)
        assert "'~/masks/bad name' is not a valid ROS topic name" in problem
        assert "alphanumerics" in problem and "/project/src" not in problem
        node_parameters.check_mask_topics([entry], ["~/"], node.resolve_topic_name)
    finally:
        node.destroy_node()


@pytest.mark.parametrize("path", ["-p", "--params-file"])
def test_an_empty_list_at_start_up_is_an_empty_list_of_strings(tmp_path, path):
    """rcl reads a YAML [] as "not set": it is stored as the empty string array it means."""
    if path == "-p":
        arguments = ["-p", "background_words:=[]", "-p", "cameras:=[]"]
    else:
        params = tmp_path / "ovss.yaml"
        params.write_text("/**:\n  ros__parameters:\n    background_words: []\n    cameras: []\n")
        arguments = ["--params-file", str(params)]
    context, node = node_from_arguments(arguments)
    try:
        values = node_parameters.declare_parameters(node)
        for name in ("background_words", "cameras"):
            assert values[name] == []
            parameter = node.get_parameter(name)
            assert parameter.type_ == Parameter.Type.STRING_ARRAY and parameter.value == [], name
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_a_nested_params_file_arrives_as_the_dotted_names(tmp_path):
    """A method's parameters nested by namespace in YAML (dslo: sd: size) are the dotted
    parameters rcl reads (dslo.sd.size), next to -p with the dotted name."""
    params = tmp_path / "ovss.yaml"
    nested = {"dense": {"crop": 224, "stride": 112}, "dslo": {"sd": {"size": 256}}}
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": nested}}))
    context, node = node_from_arguments(["--params-file", str(params), "-p", "pnp.layer:=9"])
    try:
        undeclared.refuse_renamed_overrides(node)  # nothing renamed: no refusal
        values = node_parameters.declare_parameters(node)
        assert (values["dense.crop"], values["dense.stride"]) == (224, 112)
        assert values["dslo.sd.size"] == 256 and values["pnp.layer"] == 9
        engine = validate(values).engine
        assert (engine.dense.crop, engine.dslo.sd.size, engine.pnp.layer) == (224, 256, 9)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.mark.parametrize("path", ["-p", "--params-file"])
def test_old_flat_names_at_start_up_are_refused_with_their_new_names(tmp_path, path):
    if path == "-p":
        arguments = ["-p", "crop:=224", "-p", "sd_size:=256"]
    else:
        params = tmp_path / "ovss.yaml"
        params.write_text(
            yaml.safe_dump({"/**": {"ros__parameters": {"crop": 224, "sd_size": 256}}})
        )
        arguments = ["--params-file", str(params)]
    context, node = node_from_arguments(arguments)
    try:
        with pytest.raises(ParameterError) as refused:
            undeclared.refuse_renamed_overrides(node)
        assert str(refused.value) == (
            "crop was renamed dense.crop; sd_size was renamed dslo.sd.size"
        )
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
