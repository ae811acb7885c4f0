"""What ``launch/ovss.launch.py`` starts, as plain data: the launch arguments -> process specs.

ROS launch (``launch``, ``launch_ros``) has no wheels, so the launch file itself cannot run on the
project's machines. All of its decisions live here instead, free of launch imports, where tests
can check them and start the very command line the launch would run: ``plan()`` turns the
argument strings into one ``ProcessSpec`` per process, and ``ros_args()`` renders a spec as the
command that ``ros2 run`` / ``launch_ros`` produce. The launch file only maps specs onto
``launch_ros.actions.Node``.

A note on parameter files: a node pushed into a namespace is ``/<ns>/ovss``, and a params file
keyed ``ovss:`` only matches ``/ovss``, so rclpy silently ignores it there. Files used with a
namespace need the key ``/**:`` (any node) or ``/<ns>/ovss:``; ``plan()`` warns when the file
given has no key that matches the node it configures.

Parameter names: a method's parameters are namespaced (``dense.crop``), nested in a params file
(``dense: {crop: 224}``), which rcl reads as the dotted name (``flatten_parameters``). A flat
name of an earlier release (``crop``) in the params file or the overrides is refused here, at
launch, with its new name (``crop was renamed dense.crop``), as the node would refuse it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ovss_ros.safe_yaml import MAX_PARAMS_FILE_BYTES, flatten_parameters, load_yaml, short_repr

PACKAGE = "ovss_ros"
EXECUTABLE = "ovss_node"
# ovss_ros.ros.node.NODE_NAME; not imported: that would pull rclpy and torch into a launch file.
NODE_NAME = "ovss"
# What the node subscribes to, relative so that the namespace and remapping move them.
INPUT_TOPICS = ("image", "camera_info")
# Topics config/ovss.rviz shows, as the default launch (no namespace, no remapping) names them.
RVIZ_OVERLAY = f"/{NODE_NAME}/overlay"
RVIZ_LABELS = f"/{NODE_NAME}/labels"
RVIZ_INPUT = "/image"
RVIZ_POINTS = f"/{NODE_NAME}/points"  # with depth.enabled
RVIZ_OBJECTS = f"/{NODE_NAME}/objects"
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NAME_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchPlanError(ValueError):
    """A launch argument cannot be used; ``str(error)`` says which and what to write instead."""


@dataclass(frozen=True)
class Argument:
    """One launch argument: its default (always a string, as launch passes them) and meaning."""

    default: str
    description: str


ARGUMENTS: dict[str, Argument] = {
    "namespace": Argument(
        "", "namespace of the ovss node, e.g. front_camera: the node becomes /front_camera/ovss"
    ),
    "image": Argument(
        "image",
        "input sensor_msgs/Image topic (relative names follow the namespace), "
        "e.g. /camera/color/image_raw",
    ),
    "camera_info": Argument(
        "camera_info", "input sensor_msgs/CameraInfo topic (relative names follow the namespace)"
    ),
    "params_file": Argument("", "node parameters YAML; empty = the package's config/ovss.yaml"),
    "classes": Argument(
        "",
        "vocabulary as a YAML list, e.g. \"['person', 'cup; mug']\"; "
        "empty = the params file's value",
    ),
    "device": Argument("", "auto | cpu | cuda | cuda:N; empty = the params file's value"),
    "use_rviz": Argument("false", "also start rviz2 showing the input, overlay and labels"),
    "rviz_config": Argument("", "RViz2 config; empty = the package's config/ovss.rviz"),
    "log_level": Argument("info", "log level of the started processes: " + " | ".join(LOG_LEVELS)),
}


@dataclass(frozen=True)
class ProcessSpec:
    """One process the launch starts, in the terms of ``launch_ros.actions.Node``."""

    package: str
    executable: str
    name: str
    namespace: str = ""  # absolute ("/front_camera") or "" for the root namespace
    remappings: tuple[tuple[str, str], ...] = ()
    params_files: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)  # overrides, applied after files
    arguments: tuple[str, ...] = ()  # the program's own arguments, before --ros-args
    ros_arguments: tuple[str, ...] = ()  # e.g. --log-level info
    enabled: bool = True  # False: declared but not started (rviz2 without use_rviz)
    warnings: tuple[str, ...] = ()  # what the launch should tell the user before starting

    @property
    def fully_qualified_name(self) -> str:
        return f"{self.namespace}/{self.name}"


def plan(
    arguments: Mapping[str, str], extra_parameters: Mapping[str, Any] | None = None
) -> list[ProcessSpec]:
    """The processes the launch starts for these argument values: the ovss node, then rviz2.

    ``arguments`` holds launch argument strings (missing ones take their defaults; unknown ones
    are refused, so a typo is not silently ignored). ``extra_parameters`` are further overrides
    of the ovss node's parameters, applied last (tests use them to select a tiny model).
    """
    unknown = sorted(set(arguments) - set(ARGUMENTS))
    if unknown:
        raise LaunchPlanError(f"unknown launch arguments {unknown}: known are {list(ARGUMENTS)}")
    values = {
        name: str(arguments.get(name, argument.default)) for name, argument in ARGUMENTS.items()
    }
    namespace = parse_namespace(values["namespace"])
    log_level = parse_log_level(values["log_level"])
    use_rviz = parse_bool("use_rviz", values["use_rviz"])

    overrides: dict[str, Any] = {}
    classes = parse_classes(values["classes"])
    if classes is not None:
        overrides["classes"] = classes
    if values["device"].strip():
        overrides["device"] = values["device"].strip()
    overrides.update(extra_parameters or {})

    params_file = values["params_file"].strip() or str(default_file("ovss.yaml"))
    if not Path(params_file).is_file():
        raise LaunchPlanError(f"params_file {params_file} does not exist")
    ovss_fqn = f"{namespace}/{NODE_NAME}"
    refuse_renamed(params_file_parameters(params_file, ovss_fqn), f"params_file {params_file}")
    refuse_renamed(overrides, "parameters")
    warnings = ()
    if not params_file_matches(params_file, ovss_fqn):
        warnings = (
            f"{params_file} has no key matching {ovss_fqn} (e.g. '/**:' or '{ovss_fqn}:'), "
            "so the node ignores it and runs with its built-in defaults",
        )
    remappings = tuple(
        (topic, values[topic]) for topic in INPUT_TOPICS if values[topic].strip() != topic
    )
    ros_arguments = ("--log-level", log_level)
    ovss = ProcessSpec(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace=namespace,
        remappings=remappings,
        params_files=(params_file,),
        parameters=overrides,
        ros_arguments=ros_arguments,
        warnings=warnings,
    )

    rviz_config = values["rviz_config"].strip() or str(default_file("ovss.rviz"))
    if use_rviz and not Path(rviz_config).is_file():
        raise LaunchPlanError(f"rviz_config {rviz_config} does not exist")
    # config/ovss.rviz names the default topics; remapping them in rviz2 makes the one config
    # file follow the namespace and the input topic chosen here.
    rviz_topics = {
        RVIZ_OVERLAY: f"{ovss_fqn}/overlay",
        RVIZ_LABELS: f"{ovss_fqn}/labels",
        RVIZ_POINTS: f"{ovss_fqn}/points",
        RVIZ_OBJECTS: f"{ovss_fqn}/objects",
        RVIZ_INPUT: resolve_topic(values["image"].strip(), namespace),
    }
    rviz = ProcessSpec(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        remappings=tuple((old, new) for old, new in rviz_topics.items() if old != new),
        arguments=("-d", rviz_config),
        ros_arguments=ros_arguments,
        enabled=use_rviz,
    )
    return [ovss, rviz]


def params_file_parameters(path: str | Path, fully_qualified_name: str) -> dict[str, Any]:
    """The parameters (dotted names) a params file gives the node of that name: the
    ``ros__parameters`` of every key that matches it, flattened, later keys winning as in rcl.
    Empty for a file that cannot be read as a params file (the node says why)."""
    content = _params_document(path)
    found: dict[str, Any] = {}
    for key, entry in content.items():
        if not node_key_matches(str(key), fully_qualified_name) or not isinstance(entry, dict):
            continue
        parameters = entry.get("ros__parameters")
        if isinstance(parameters, Mapping):
            try:
                found.update(flatten_parameters(parameters))
            except ValueError:  # a name given twice with two values: not read here
                return {}
    return found


def refuse_renamed(parameters: Mapping[str, Any], where: str) -> None:
    """Raise LaunchPlanError if ``parameters`` names a parameter of an earlier release, with the
    new name (``crop was renamed dense.crop``): the node would refuse to start with it."""
    # The one table of the renamed parameters (core.config.RENAMED); imported only here.
    from ovss_ros.core.config import RENAMED, unknown_setting

    reasons = [unknown_setting(str(name)) for name in parameters if name in RENAMED]
    if reasons:
        raise LaunchPlanError(f"{where}: {'; '.join(reasons)}")


def ros_args(spec: ProcessSpec) -> list[str]:
    """The command line ``ros2 run`` / ``launch_ros`` give the process, executable first.

    Order matters: rcl reads ``--params-file`` and ``-p`` into one table in command-line order,
    so the overrides come after the files to win over them.
    """
    args = [spec.executable, *spec.arguments, "--ros-args", "-r", f"__node:={spec.name}"]
    if spec.namespace:
        args += ["-r", f"__ns:={spec.namespace}"]
    for old, new in spec.remappings:
        args += ["-r", f"{old}:={new}"]
    for path in spec.params_files:
        args += ["--params-file", path]
    for name, value in spec.parameters.items():
        args += ["-p", f"{name}:={parameter_text(value)}"]
    return args + list(spec.ros_arguments)


def parameter_text(value: Any) -> str:
    """A value as ``-p name:=value`` reads it: YAML, written as JSON (strings stay strings)."""
    return json.dumps(value)


def parse_classes(text: str) -> list[str] | None:
    """The ``classes`` argument: a YAML list of strings, or None for "keep the file's value".

    A YAML list lets an entry hold commas and the ``;`` synonyms of the vocabulary syntax.
    Anything else is refused here, at launch, instead of by a node that is already loading.
    """
    if not text.strip():
        return None
    example = "write a YAML list, e.g. classes:=\"['person', 'cup; mug']\""
    try:
        value = load_yaml(text)
    except yaml.YAMLError as error:
        raise LaunchPlanError(
            f"classes {short_repr(text)} is not valid YAML ({' '.join(str(error).split())}): "
            f"{example}"
        ) from None
    if not isinstance(value, list):
        raise LaunchPlanError(f"classes {short_repr(text)} is not a list: {example}")
    if not value:
        raise LaunchPlanError(f"classes {text!r} is empty: give at least one class")
    for index, entry in enumerate(value):
        if not isinstance(entry, str):
            # YAML reads unquoted yes/no/on/off/null and numbers as non-text.
            raise LaunchPlanError(
                f"classes entry {index} is {short_repr(entry)} ({type(entry).__name__}), not "
                "text: quote it, e.g. \"['on', '1']\""
            )
    return value


def parse_namespace(text: str) -> str:
    """``front_camera`` or ``/front_camera`` -> ``/front_camera``; empty -> "" (the root)."""
    tokens = [token for token in text.strip().strip("/").split("/") if token]
    for token in tokens:
        if not _NAME_TOKEN.fullmatch(token):
            raise LaunchPlanError(
                f"namespace {text!r}: {token!r} is not a ROS name (letters, digits, '_'; "
                "not starting with a digit)"
            )
    return "".join(f"/{token}" for token in tokens)


def parse_log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise LaunchPlanError(f"log_level {text!r}: use one of {list(LOG_LEVELS)}")
    return level


def parse_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise LaunchPlanError(f"{name} {text!r}: use true or false")


def resolve_topic(topic: str, namespace: str) -> str:
    """The absolute name of a topic the node in ``namespace`` subscribes to as ``topic``."""
    if topic.startswith("/"):
        return topic
    return f"{namespace}/{topic}"


def default_file(name: str) -> Path:
    """``config/<name>`` of the installed package, else of this source tree.

    A colcon install has the share directory; the standalone venv's editable install does not
    copy data files (and has no AMENT_PREFIX_PATH), so the repository's config/ is used there.
    """
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory(PACKAGE)) / "config" / name
        if installed.is_file():
            return installed
    except (ImportError, LookupError, OSError):  # PackageNotFoundError is a KeyError
        pass
    return Path(__file__).resolve().parents[2] / "config" / name


def params_file_matches(path: str | Path, fully_qualified_name: str) -> bool:
    """Whether a ROS params file has a node key that applies to the node of that name.

    rcl's rules: a key without a leading '/' gets one, ``*`` stands for one name token and
    ``**`` for any number of them (``/**`` matches every node).
    """
    content = _params_document(path)
    return any(node_key_matches(str(key), fully_qualified_name) for key in content)


def _params_document(path: str | Path) -> dict:
    """A params file's top-level mapping; empty when it is no such file."""
    try:
        path = Path(path)
        if not path.is_file() or path.stat().st_size > MAX_PARAMS_FILE_BYTES:
            return {}  # not a params file this plan reads: the node says why
        content = load_yaml(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def node_key_matches(key: str, fully_qualified_name: str) -> bool:
    """rcl's wildcard match of one params-file node key against a fully qualified node name."""
    pattern = ""
    for token in key.strip("/").split("/"):
        if token == "**":
            pattern += r"(/[^/]+)*"
        elif token == "*":
            pattern += r"/[^/]+"
        else:
            pattern += "/" + re.escape(token)
    return re.fullmatch(pattern, fully_qualified_name) is not None
