"""The launch plan: argument parsing, rendered command lines, the launch file, a real node start.

ROS launch has no wheels, so ``launch/ovss.launch.py`` cannot run here. What it would do is tested
in four steps instead: ``launch_plan.plan()`` / ``ros_args()`` as plain data; rcl itself parsing
the rendered command lines (in-process, cheap); the launch file executed against stand-ins for
``launch`` / ``launch_ros`` that record what it builds; and finally the node process started
with exactly the command line of the plan, checked over DDS.
"""

from __future__ import annotations

import ast
import importlib.util
import py_compile
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import rclpy
import yaml
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from ros_harness import (
    REPO_ROOT,
    TINY_NODE_PARAMETERS,
    NodeProcess,
    OvssClient,
    image_array,
    isolate_dds,
    make_image,
    next_header,
)
from sensor_msgs.msg import Image

from ovss_ros.ros import launch_plan
from ovss_ros.ros.launch_plan import LaunchPlanError, ProcessSpec, plan, ros_args

LAUNCH_FILE = REPO_ROOT / "launch" / "ovss.launch.py"
RVIZ_FILE = REPO_ROOT / "config" / "ovss.rviz"
CLASSES = ["person", "cup; mug", "potted plant"]
CLASSES_ARGUMENT = "['person', 'cup; mug', 'potted plant']"


def write_params_file(path: Path, key: str = "/**", **changes: Any) -> Path:
    """config/ovss.yaml's parameters under ``key``, whatever key the shipped file uses."""
    content = yaml.safe_load((REPO_ROOT / "config" / "ovss.yaml").read_text())
    ((_, node),) = content.items()
    node["ros__parameters"].update(changes)
    path.write_text(yaml.safe_dump({key: node}))
    return path


@pytest.fixture
def any_namespace_params(tmp_path: Path) -> Path:
    return write_params_file(tmp_path / "ovss.yaml")


def ovss_and_rviz(arguments: dict[str, str], **kwargs: Any) -> tuple[ProcessSpec, ProcessSpec]:
    ovss, rviz = plan(arguments, **kwargs)
    assert (ovss.executable, rviz.executable) == ("ovss_node", "rviz2")
    return ovss, rviz


# plan(): the argument strings as data.


def test_defaults_start_the_node_alone_with_the_package_config():
    ovss, rviz = ovss_and_rviz({})
    assert (ovss.package, ovss.name, ovss.namespace) == ("ovss_ros", "ovss", "")
    assert ovss.remappings == ()
    (params_file,) = ovss.params_files
    assert Path(params_file).is_file() and Path(params_file).name == "ovss.yaml"
    assert ovss.parameters == {}  # classes and device: the file's values
    assert ovss.ros_arguments == ("--log-level", "info")
    assert ovss.enabled
    assert not rviz.enabled
    assert ros_args(ovss) == [
        "ovss_node",
        "--ros-args",
        "-r",
        "__node:=ovss",
        "--params-file",
        params_file,
        "--log-level",
        "info",
    ]


def test_every_declared_argument_has_a_string_default_and_a_description():
    for name, argument in launch_plan.ARGUMENTS.items():
        assert isinstance(argument.default, str), name
        assert argument.description, name
    assert set(launch_plan.ARGUMENTS) == {
        "namespace",
        "image",
        "camera_info",
        "params_file",
        "classes",
        "device",
        "use_rviz",
        "rviz_config",
        "log_level",
    }


def test_unknown_argument_is_refused():
    with pytest.raises(LaunchPlanError, match="unknown launch arguments \\['use_rvis'\\]"):
        plan({"use_rvis": "true"})


@pytest.mark.parametrize(
    ("text", "namespace"),
    [
        ("", ""),
        ("/", ""),
        ("front_camera", "/front_camera"),
        ("/front_camera/", "/front_camera"),
        ("robot/front_camera", "/robot/front_camera"),
    ],
)
def test_namespace_is_made_absolute(text, namespace, any_namespace_params):
    (ovss, rviz) = ovss_and_rviz({"namespace": text, "params_file": str(any_namespace_params)})
    assert ovss.namespace == namespace
    assert ovss.fully_qualified_name == f"{namespace}/ovss"
    assert rviz.namespace == ""  # rviz2 stays global; remapping points it at the node
    if namespace:
        assert ros_args(ovss)[2:6] == ["-r", "__node:=ovss", "-r", f"__ns:={namespace}"]
    else:
        assert not any(arg.startswith("__ns") for arg in ros_args(ovss))


@pytest.mark.parametrize("text", ["1cam", "front camera", "front-camera", "a//b/c d"])
def test_namespace_that_is_not_a_ros_name_is_refused(text):
    with pytest.raises(LaunchPlanError, match="not a ROS name"):
        plan({"namespace": text})


def test_inputs_are_remapped_only_when_changed():
    ovss, _ = ovss_and_rviz({"image": "/cam/image_raw", "camera_info": "camera_info"})
    assert ovss.remappings == (("image", "/cam/image_raw"),)
    ovss, _ = ovss_and_rviz({"image": "color/image_raw", "camera_info": "/cam/camera_info"})
    assert ovss.remappings == (("image", "color/image_raw"), ("camera_info", "/cam/camera_info"))
    assert "-r" in ros_args(ovss) and "camera_info:=/cam/camera_info" in ros_args(ovss)


def test_classes_are_a_yaml_list_of_strings():
    ovss, _ = ovss_and_rviz({"classes": CLASSES_ARGUMENT})
    assert ovss.parameters == {"classes": CLASSES}
    ovss, _ = ovss_and_rviz({"classes": '["a, b", "c"]'})  # commas inside an entry survive
    assert ovss.parameters == {"classes": ["a, b", "c"]}
    ovss, _ = ovss_and_rviz({"classes": "  "})
    assert "classes" not in ovss.parameters


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("person", "not a list"),
        ("person, cup", "not a list"),
        ("{person: 1}", "not a list"),
        ("[]", "is empty"),
        ("['person', 1]", "entry 1 is 1 \\(int\\), not text"),
        ("[person, on]", "entry 1 is True \\(bool\\), not text: quote it"),
        ("[person, null]", "entry 1 is None"),
        ("['person'", "not valid YAML"),
    ],
)
def test_classes_that_are_not_a_list_of_strings_are_refused(text, reason):
    with pytest.raises(LaunchPlanError, match=reason):
        plan({"classes": text})


def test_device_is_overridden_only_when_given():
    ovss, _ = ovss_and_rviz({"device": ""})
    assert "device" not in ovss.parameters
    ovss, _ = ovss_and_rviz({"device": " cuda:1 "})
    assert ovss.parameters == {"device": "cuda:1"}
    assert ros_args(ovss)[-4:-2] == ["-p", 'device:="cuda:1"']  # quoted: stays a string


def test_extra_parameters_are_applied_last():
    ovss, _ = ovss_and_rviz(
        {"classes": "['a']", "device": "cpu"},
        extra_parameters={"classes": ["b"], "dense.crop": 64},
    )
    assert ovss.parameters == {"classes": ["b"], "device": "cpu", "dense.crop": 64}


def test_overrides_follow_the_params_file_so_that_they_win():
    ovss, _ = ovss_and_rviz({"classes": "['a']", "log_level": "WARN"})
    command = ros_args(ovss)
    assert command.index("--params-file") < command.index("-p")
    assert command[-4:] == ["-p", 'classes:=["a"]', "--log-level", "warn"]


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error", "fatal", " Debug "])
def test_log_level_goes_to_every_process(level):
    for spec in plan({"log_level": level, "use_rviz": "true"}):
        assert ros_args(spec)[-2:] == ["--log-level", level.strip().lower()]


def test_unknown_log_level_is_refused():
    with pytest.raises(LaunchPlanError, match="log_level 'verbose'"):
        plan({"log_level": "verbose"})


@pytest.mark.parametrize(("text", "enabled"), [("true", True), ("True", True), ("false", False)])
def test_rviz_runs_only_with_use_rviz(text, enabled):
    _, rviz = ovss_and_rviz({"use_rviz": text})
    assert rviz.enabled is enabled
    assert (rviz.package, rviz.name) == ("rviz2", "rviz2")
    # The installed share/ovss_ros/config/ovss.rviz on a colcon install, else the repository's.
    default = launch_plan.default_file("ovss.rviz")
    assert default.is_file() and default.read_text() == RVIZ_FILE.read_text()
    assert rviz.arguments == ("-d", str(default))
    command = ros_args(rviz)
    assert command[:4] == ["rviz2", "-d", str(default), "--ros-args"]


def test_use_rviz_must_be_a_boolean():
    with pytest.raises(LaunchPlanError, match="use_rviz 'maybe': use true or false"):
        plan({"use_rviz": "maybe"})


def test_rviz_is_pointed_at_the_namespaced_node_and_the_chosen_input(any_namespace_params):
    _, rviz = ovss_and_rviz(
        {
            "namespace": "front_camera",
            "image": "color/image_raw",
            "params_file": str(any_namespace_params),
        }
    )
    assert dict(rviz.remappings) == {
        "/ovss/overlay": "/front_camera/ovss/overlay",
        "/ovss/labels": "/front_camera/ovss/labels",
        "/ovss/points": "/front_camera/ovss/points",
        "/ovss/objects": "/front_camera/ovss/objects",
        "/image": "/front_camera/color/image_raw",
    }
    _, rviz = ovss_and_rviz({})
    assert rviz.remappings == ()  # the config's own topics


def test_missing_files_are_refused(tmp_path):
    with pytest.raises(LaunchPlanError, match="params_file .* does not exist"):
        plan({"params_file": str(tmp_path / "nope.yaml")})
    with pytest.raises(LaunchPlanError, match="rviz_config .* does not exist"):
        plan({"use_rviz": "true", "rviz_config": str(tmp_path / "nope.rviz")})
    plan({"rviz_config": str(tmp_path / "nope.rviz")})  # not needed without rviz2


def test_a_params_file_that_does_not_reach_the_namespaced_node_is_reported(tmp_path):
    only_root = write_params_file(tmp_path / "root.yaml", key="ovss")
    ovss, _ = ovss_and_rviz({"params_file": str(only_root)})
    assert ovss.warnings == ()
    ovss, _ = ovss_and_rviz({"params_file": str(only_root), "namespace": "front_camera"})
    (warning,) = ovss.warnings
    assert "no key matching /front_camera/ovss" in warning and "'/**:'" in warning
    anywhere = write_params_file(tmp_path / "any.yaml", key="/**")
    ovss, _ = ovss_and_rviz({"params_file": str(anywhere), "namespace": "front_camera"})
    assert ovss.warnings == ()


# rcl reads the rendered command lines as the plan means them (in-process, no DDS traffic).

KEY_CASES = [
    "ovss",
    "/ovss",
    "/**",
    "/front_camera/ovss",
    "/*/ovss",
    "/**/ovss",
    "/*",
    "front_camera/*",
]


def rcl_node(arguments: list[str], name: str = "placeholder") -> tuple[rclpy.Context, Node]:
    """A node whose context got ``arguments`` as its process command line (global ROS args)."""
    context = rclpy.Context()
    context.init(args=["program", *arguments])
    return context, Node(name, context=context)


@pytest.mark.parametrize("key", KEY_CASES)
@pytest.mark.parametrize("namespace", ["", "/front_camera", "/robot/front"])
def test_params_file_key_matching_agrees_with_rcl(tmp_path, key, namespace):
    path = write_params_file(tmp_path / "p.yaml", key=key, device="from_file")
    arguments = ["--ros-args", "-r", "__node:=ovss", "--params-file", str(path)]
    if namespace:
        arguments += ["-r", f"__ns:={namespace}"]
    context, node = rcl_node(arguments)
    try:
        applied = node.declare_parameter("device", "default").value == "from_file"
        fqn = node.get_fully_qualified_name()
    finally:
        node.destroy_node()
        context.shutdown()
    assert fqn == f"{namespace}/ovss"
    assert launch_plan.params_file_matches(path, fqn) is applied, (key, fqn, applied)


def test_rcl_reads_the_rendered_node_command_as_planned(any_namespace_params):
    ovss, _ = ovss_and_rviz(
        {
            "namespace": "front_camera",
            "image": "/cam/image_raw",
            "params_file": str(any_namespace_params),
            "classes": CLASSES_ARGUMENT,
            "device": "cpu",
        }
    )
    command = ros_args(ovss)
    context, node = rcl_node(command[1:])
    try:
        assert node.get_fully_qualified_name() == "/front_camera/ovss"
        assert node.resolve_topic_name("image") == "/cam/image_raw"
        assert node.resolve_topic_name("camera_info") == "/front_camera/camera_info"
        assert node.resolve_topic_name("~/labels") == "/front_camera/ovss/labels"
        # The overrides beat the file's values; the file's other values arrive.
        assert node.declare_parameter("classes", ["x"]).value == CLASSES
        assert node.declare_parameter("device", "x").value == "cpu"
        assert node.declare_parameter("short_side", 1).value == 448
    finally:
        node.destroy_node()
        context.shutdown()


def test_rcl_points_rviz_at_the_namespaced_topics(any_namespace_params):
    _, rviz = ovss_and_rviz(
        {
            "namespace": "front_camera",
            "image": "/cam/image_raw",
            "params_file": str(any_namespace_params),
            "use_rviz": "true",
        }
    )
    command = ros_args(rviz)
    assert command[:3] == ["rviz2", "-d", str(launch_plan.default_file("ovss.rviz"))]
    context, node = rcl_node(command[3:])
    try:
        assert node.get_fully_qualified_name() == "/rviz2"
        # The topics config/ovss.rviz names, as rviz2 would subscribe to them.
        assert node.resolve_topic_name("/ovss/overlay") == "/front_camera/ovss/overlay"
        assert node.resolve_topic_name("/ovss/labels") == "/front_camera/ovss/labels"
        assert node.resolve_topic_name("/ovss/points") == "/front_camera/ovss/points"
        assert node.resolve_topic_name("/ovss/objects") == "/front_camera/ovss/objects"
        assert node.resolve_topic_name("/image") == "/cam/image_raw"
    finally:
        node.destroy_node()
        context.shutdown()


# The launch file: compiles, declares every argument, and maps the plan onto launch_ros Nodes.


def test_launch_file_compiles_and_uses_the_plan():
    py_compile.compile(str(LAUNCH_FILE), doraise=True, cfile=None)
    tree = ast.parse(LAUNCH_FILE.read_text())
    attributes = {
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
    }
    assert {"launch_plan.plan", "launch_plan.ARGUMENTS"} <= attributes
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert {"DeclareLaunchArgument", "OpaqueFunction", "Node", "LaunchDescription"} <= called


class Recorded:
    """Stands in for a launch action: keeps what it was built with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


def fake_launch_modules() -> dict[str, types.ModuleType]:
    """``launch`` and ``launch_ros`` with the few names the launch file uses, recording calls."""
    modules = {
        name: types.ModuleType(name)
        for name in (
            "launch",
            "launch.actions",
            "launch.launch_context",
            "launch.launch_description",
            "launch_ros",
            "launch_ros.actions",
        )
    }
    for module, names in (
        ("launch.actions", ("DeclareLaunchArgument", "LogInfo", "OpaqueFunction")),
        ("launch.launch_context", ("LaunchContext",)),
        ("launch.launch_description", ("LaunchDescription",)),
        ("launch_ros.actions", ("Node",)),
    ):
        for name in names:
            setattr(modules[module], name, type(name, (Recorded,), {}))
    modules["launch"].LaunchDescription = modules["launch.launch_description"].LaunchDescription
    return modules


def run_launch_file(monkeypatch, arguments: dict[str, str]) -> tuple[list[Recorded], list]:
    """Load the launch file against the stand-ins; return its declarations and started actions."""
    for name, module in fake_launch_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("ovss_launch_under_test", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (entities,) = module.generate_launch_description().args
    *declared, opaque = entities
    assert type(opaque).__name__ == "OpaqueFunction"
    # What launch does: every declared argument in the context, given value or default.
    configurations = {d.args[0]: d.kwargs["default_value"] for d in declared} | arguments
    context = types.SimpleNamespace(launch_configurations=configurations)
    return declared, opaque.kwargs["function"](context)


def test_launch_file_declares_every_plan_argument(monkeypatch):
    declared, _ = run_launch_file(monkeypatch, {})
    assert [d.args[0] for d in declared] == list(launch_plan.ARGUMENTS)
    for declaration in declared:
        argument = launch_plan.ARGUMENTS[declaration.args[0]]
        assert declaration.kwargs["default_value"] == argument.default
        assert declaration.kwargs["description"] == argument.description


def test_launch_file_starts_what_the_plan_enables(monkeypatch, tmp_path):
    root_only = write_params_file(tmp_path / "root.yaml", key="ovss")
    arguments = {
        "namespace": "front_camera",
        "image": "/cam/image_raw",
        "classes": CLASSES_ARGUMENT,
        "params_file": str(root_only),
        "use_rviz": "true",
    }
    _, actions = run_launch_file(monkeypatch, arguments)
    ovss, rviz = plan(arguments)
    log, *nodes = actions
    assert type(log).__name__ == "LogInfo" and ovss.warnings[0] in log.kwargs["msg"]
    assert [node.kwargs["executable"] for node in nodes] == ["ovss_node", "rviz2"]
    for node, spec in zip(nodes, (ovss, rviz), strict=True):
        assert node.kwargs["package"] == spec.package
        assert node.kwargs["name"] == spec.name
        assert node.kwargs["namespace"] == spec.namespace
        assert node.kwargs["remappings"] == list(spec.remappings)
        assert node.kwargs["arguments"] == list(spec.arguments)
        assert node.kwargs["ros_arguments"] == list(spec.ros_arguments)
    assert nodes[0].kwargs["parameters"] == [str(root_only), {"classes": CLASSES}]
    assert nodes[1].kwargs["parameters"] == []

    _, actions = run_launch_file(monkeypatch, {"use_rviz": "false"})
    assert [action.kwargs["executable"] for action in actions] == ["ovss_node"]


# config/ovss.rviz


def test_rviz_config_shows_input_overlay_and_labels():
    config = yaml.safe_load(RVIZ_FILE.read_text())
    manager = config["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "camera"
    images = [d for d in manager["Displays"] if d["Class"] == "rviz_default_plugins/Image"]
    topics = {display["Topic"]["Value"]: display["Topic"] for display in images}
    assert set(topics) == {
        launch_plan.RVIZ_INPUT,
        launch_plan.RVIZ_OVERLAY,
        launch_plan.RVIZ_LABELS,
    }
    for name, topic in topics.items():
        assert topic["Depth"] == 1
        assert topic["Durability Policy"] == "Volatile"
        expected = "Best Effort" if name == launch_plan.RVIZ_INPUT else "Reliable"
        assert topic["Reliability Policy"] == expected, name
    assert all(display["Enabled"] for display in images)
    assert {panel["Class"] for panel in config["Panels"]} >= {"rviz_common/Displays"}


# Parameter names (issue 19): nested in the file, dotted for the node; old flat names refused.


def test_the_shipped_params_file_is_read_as_the_nodes_dotted_names():
    from ovss_ros.ros import parameters as node_parameters

    found = launch_plan.params_file_parameters(REPO_ROOT / "config" / "ovss.yaml", "/ovss")
    assert found == node_parameters.defaults()
    assert found["dslo.sd.size"] == 512 and "dslo" not in found


def test_flatten_parameters_reads_namespaces_as_rcl_does():
    nested = {"classes": ["a"], "dslo": {"mode": "ot", "sd": {"size": 256}}, "pnp.layer": 9}
    assert launch_plan.flatten_parameters(nested) == {
        "classes": ["a"],
        "dslo.mode": "ot",
        "dslo.sd.size": 256,
        "pnp.layer": 9,
    }


def test_an_old_flat_name_in_the_params_file_is_refused_with_its_new_name(tmp_path):
    old = write_params_file(tmp_path / "old.yaml", crop=224, sd_size=256)
    with pytest.raises(LaunchPlanError) as refused:
        plan({"params_file": str(old)})
    assert str(refused.value) == (
        f"params_file {old}: crop was renamed dense.crop; sd_size was renamed dslo.sd.size"
    )
    # Under a key for another node only: not this node's parameters, not refused here.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"/robot/other": {"ros__parameters": {"crop": 224}}}))
    plan({"params_file": str(other)})
    nested = write_params_file(tmp_path / "new.yaml", dense={"crop": 224})
    (ovss, _) = ovss_and_rviz({"params_file": str(nested)})
    assert ovss.params_files == (str(nested),)


def test_an_old_flat_name_among_the_overrides_is_refused_with_its_new_name():
    with pytest.raises(LaunchPlanError, match="^parameters: pnp_layer was renamed pnp.layer$"):
        plan({}, extra_parameters={"pnp_layer": 9})
    ovss, _ = ovss_and_rviz({}, extra_parameters={"pnp.layer": 9})
    assert ovss.parameters == {"pnp.layer": 9}


# The node, started with exactly the plan's command line, over real DDS.


def test_node_started_from_the_plan_serves_its_namespace(tmp_path, voc_rgb):
    # overlay_alpha 0.25 (default 0.5) shows that the '/**' file reached the namespaced node.
    # pnp: layer: 9 (default 8): a nested value reached the node as pnp.layer.
    params_file = write_params_file(tmp_path / "ovss.yaml", overlay_alpha=0.25, pnp={"layer": 9})
    ovss, rviz = ovss_and_rviz(
        {
            "namespace": "front_camera",
            "image": "/cam/image_raw",
            "params_file": str(params_file),
            "classes": CLASSES_ARGUMENT,
            "log_level": "warn",
        },
        extra_parameters=TINY_NODE_PARAMETERS,
    )
    assert ovss.warnings == () and not rviz.enabled
    command = ros_args(ovss)
    assert command[:2] == ["ovss_node", "--ros-args"]
    isolate_dds()
    # `ovss_node` is `python -m ovss_ros.ros.node` here: the same main(), no console script needed.
    with NodeProcess(extra_ros_args=command[2:]) as process:
        assert process.args == [sys.executable, "-m", "ovss_ros.ros.node", *command[1:]]
        rclpy.init()
        client = OvssClient(node_namespace="/front_camera/ovss")
        try:
            client.image_pubs[""] = client.node.create_publisher(
                Image, "/cam/image_raw", qos_profile_sensor_data
            )
            client.spin_until(
                lambda: (
                    process.returncode is not None
                    or (
                        client.image_pub.get_subscription_count() > 0
                        and client.messages["/front_camera/ovss/label_info"]
                    )
                ),
                60.0,
                message=lambda: f"node start-up; its output:\n{process.output()}",
            )
            assert process.returncode is None, process.output()
            # Node names travel separately from the endpoints (ros_discovery_info): poll.
            client.spin_until(
                lambda: ("ovss", "/front_camera") in client.node.get_node_names_and_namespaces(),
                message=lambda: f"node /front_camera/ovss in {client.node.get_node_names()}",
            )
            readers = client.spin_until(
                lambda: [
                    (info.node_name, info.node_namespace)
                    for info in client.node.get_subscriptions_info_by_topic("/cam/image_raw")
                    if info.node_name == "ovss"
                ],
                message="the node's subscription to /cam/image_raw",
            )
            assert readers == [("ovss", "/front_camera")]

            rgb = voc_rgb[0]
            message = make_image(rgb, "rgb8", next_header(client.node))
            out = client.wait_for_output(message, ("labels", "label_info"))
            labels = image_array(out["labels"])
            assert labels.shape == rgb.shape[:2]
            names = [entry.class_name for entry in out["label_info"].class_map]
            assert names == ["person", "cup", "potted plant"]  # the classes argument won
            assert client.get_parameter("overlay_alpha") == 0.25  # the params file applied
            assert client.get_parameter("pnp.layer") == 9
            assert client.get_parameter("device") == "auto"
            assert client.get_parameter("model") == TINY_NODE_PARAMETERS["model"]
        finally:
            client.destroy()
            rclpy.shutdown()
        assert process.stop() == 0, process.output()
        # --log-level warn: the node's info line about the loaded model is not printed.
        assert "[INFO]" not in process.output(), process.output()


def test_rviz_config_shows_the_labelled_cloud_and_the_class_markers():
    """With depth.enabled: ~/points coloured by its label field, ~/objects' two namespaces."""
    displays = yaml.safe_load(RVIZ_FILE.read_text())["Visualization Manager"]["Displays"]
    by_class = {display["Class"]: display for display in displays}
    cloud = by_class["rviz_default_plugins/PointCloud2"]
    assert cloud["Topic"]["Value"] == launch_plan.RVIZ_POINTS
    assert (cloud["Color Transformer"], cloud["Channel Name"]) == ("Intensity", "label")
    assert cloud["Topic"]["Reliability Policy"] == "Reliable"
    markers = by_class["rviz_default_plugins/MarkerArray"]
    assert markers["Topic"]["Value"] == launch_plan.RVIZ_OBJECTS
    assert markers["Namespaces"] == {"centres": True, "names": True}
    assert cloud["Enabled"] and markers["Enabled"]
