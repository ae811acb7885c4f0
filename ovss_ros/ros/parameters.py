"""The node's parameters: declared from the table, coerced, and validated as a whole.

The table (names, defaults, ranges, descriptions) is ``parameter_table.PARAMETERS``; the check of
one value is ``parameter_spec.check_value``; topic names are checked in ``topic_names``. Here:
declaring every parameter on a node, the typing rclpy needs help with (``coerce``,
``restore_types``), and the validation of a requested change: the node checks the whole
would-be configuration (all parameters after the change) before accepting anything, so a
rejected request changes nothing, and the worker thread never receives a configuration that the
engine would refuse. ``Settings`` is a validated configuration: the engine's and the node's own
(transport, cameras, what to publish, input limits).

An integer is accepted wherever a floating-point number is expected, as ``ros2 param set`` and
``-p`` type ``1`` as an integer, and stored as the float (``coerce``); every other mismatch is
refused with the parameter's name, the type given and the type expected.

This module is the parameters' one import for the rest of the adapter and the tools: it
re-exports the names of the modules above (``__all__``).
"""

from __future__ import annotations

import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rclpy.node import Node
from rclpy.parameter import Parameter

from ovss_ros.core import ClassEntry, EngineConfig, check_query_count, parse_classes
from ovss_ros.ros.depth_settings import DepthSettings, depth_settings
from ovss_ros.ros.log_text import quoted
from ovss_ros.ros.parameter_spec import (
    ParameterError,
    ParameterSpec,
    check_value,
    type_name,
)
from ovss_ros.ros.parameter_table import (
    DEFAULT_CLASSES,
    ENGINE_FIELDS,
    IMAGE_TRANSPORTS,
    METHODS,
    PARAMETERS,
    PRECISIONS,
    READ_ONLY,
    RUNTIME_ENGINE_FIELDS,
    SPECS,
    STRING_ARRAYS,
    renamed_reason,
)
from ovss_ros.ros.topic_names import (
    CAMERA_NAME,
    TOPIC_MAX_LENGTH,
    check_mask_topics,
    check_node_topics,
    mask_topic,
    parse_cameras,
)

__all__ = [
    "CAMERA_NAME",
    "DEFAULT_CLASSES",
    "ENGINE_FIELDS",
    "IMAGE_TRANSPORTS",
    "METHODS",
    "PARAMETERS",
    "PRECISIONS",
    "READ_ONLY",
    "RUNTIME_ENGINE_FIELDS",
    "SPECS",
    "STRING_ARRAYS",
    "TOPIC_MAX_LENGTH",
    "ParameterError",
    "ParameterSpec",
    "Settings",
    "check_mask_topics",
    "check_node_topics",
    "check_value",
    "coerce",
    "declare_parameters",
    "defaults",
    "engine_config",
    "in_force",
    "mask_topic",
    "normalize",
    "parse_cameras",
    "parse_classes",
    "quoted",
    "renamed_reason",
    "restore_types",
    "type_name",
    "validate",
    "validate_update",
]


@dataclass(frozen=True)
class Settings:
    """A validated configuration: what the engine gets and what the node itself uses."""

    engine: EngineConfig
    classes: list[ClassEntry]
    image_transport: str
    cameras: tuple[str, ...]  # empty: the single camera of the plain contract
    publish_masks: bool
    publish_overlay: bool
    publish_confidence: bool
    overlay_alpha: float
    overlay_legend: bool
    max_frame_age: float
    max_input_pixels: int
    depth: DepthSettings  # depth.*: labels in 3D (depth_outputs)


def defaults() -> dict[str, Any]:
    """Parameter name -> default value."""
    return {
        spec.name: list(spec.default) if isinstance(spec.default, list) else spec.default
        for spec in PARAMETERS
    }


def declare_parameters(node: Node) -> dict[str, Any]:
    """Declare every parameter (overrides from the command line or YAML apply) and return values.

    An integer given for a floating-point parameter is stored as the float (``coerce``); other
    values of the wrong type are declared as given and refused by ``validate``, which names the
    parameter and both types. Raises ParameterError, or rclpy's InvalidParameterValueException
    when an override of the right type is out of range.
    """
    values: dict[str, Any] = {}
    for spec in PARAMETERS:
        descriptor = spec.descriptor()
        descriptor.read_only = False  # made read-only once its value is final (typed, below)
        parameter = node.declare_parameter(spec.name, spec.default, descriptor)
        (typed,) = coerce([parameter])
        if spec.type == Parameter.Type.STRING_ARRAY and parameter.type_ == Parameter.Type.NOT_SET:
            typed = Parameter(spec.name, Parameter.Type.STRING_ARRAY, [])  # a YAML []
        if typed is not parameter:
            # A float given as an integer, or an empty list (rclpy makes [] a byte array, a YAML
            # [] is "not set"): store it as the value it means, range-checked as that.
            if spec.type == Parameter.Type.DOUBLE:
                check_value(spec, typed.value)
            result = node.set_parameters([typed])[0]
            if not result.successful:
                raise ParameterError(f"{spec.name}: {result.reason}")
            parameter = typed
        # rclpy hands out the stored descriptor (restore_types relies on that too).
        node.describe_parameter(spec.name).read_only = spec.read_only
        values[spec.name] = normalize(spec.name, parameter.value)
    restore_types(node)
    return values


def coerce(parameters: Sequence[Parameter]) -> list[Parameter]:
    """The parameters as they are meant: what rclpy's pre-set callback (and declaration) use.

    - an integer for a floating-point parameter becomes that float (``-p overlay_alpha:=1``);
    - an empty list of any type, or an unset value, for a string array becomes ``[]`` typed as a
      string array (``ros2 param set /ovss background_words '[]'``).

    Anything else is left as given, for ``validate`` to accept or refuse with a reason.
    """
    typed = []
    for parameter in parameters:
        spec = SPECS.get(parameter.name)
        kind = parameter.type_
        if (
            spec is not None
            and spec.type == Parameter.Type.DOUBLE
            and (kind == Parameter.Type.INTEGER)
        ):
            parameter = Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
        elif (
            spec is not None
            and spec.type == Parameter.Type.STRING_ARRAY
            and kind != Parameter.Type.STRING_ARRAY
            and kind.name.endswith("_ARRAY")
            and len(parameter.value) == 0
        ):
            parameter = Parameter(parameter.name, Parameter.Type.STRING_ARRAY, [])
        typed.append(parameter)
    return typed


def restore_types(node: Node) -> None:
    """Keep every parameter described with its own type.

    rclpy writes the type of a requested value into a dynamically typed parameter's descriptor
    before the set callbacks run, and leaves it there when they refuse the value.
    """
    for spec in PARAMETERS:
        if node.has_parameter(spec.name):
            node.describe_parameter(spec.name).type = spec.type.value


def normalize(name: str, value: Any) -> Any:
    """Plain Python values: arrays as lists; an unset string array is an empty list."""
    if name in STRING_ARRAYS:
        if value is None:
            return []
        if isinstance(value, list | tuple | array.array):  # rclpy gives numeric arrays as array
            return list(value)
    return value


def in_force(name: str, value: Any) -> Any:
    """An engine setting as the parameter's value (a tuple of background words as a list)."""
    return list(value) if isinstance(value, tuple) else value


def validate(values: Mapping[str, Any]) -> Settings:
    """Check a complete set of parameter values; raise ParameterError with the first reason."""
    missing = [spec.name for spec in PARAMETERS if spec.name not in values]
    if missing:
        raise ParameterError(f"missing parameters {missing}")
    for spec in PARAMETERS:
        check_value(spec, values[spec.name])
    try:
        classes = parse_classes(values["classes"])
    except ValueError as error:  # VocabularyError: its text already names the problem
        raise ParameterError(str(error)) from error
    cameras = parse_cameras(values["cameras"])
    engine = engine_config(values)
    try:
        engine.validate()
        check_query_count(classes, engine.background_words)
    except ValueError as error:
        raise ParameterError(str(error)) from error
    return Settings(
        engine=engine,
        classes=classes,
        image_transport=values["image_transport"],
        cameras=cameras,
        publish_masks=values["publish_masks"],
        publish_overlay=values["publish_overlay"],
        publish_confidence=values["publish_confidence"],
        overlay_alpha=float(values["overlay_alpha"]),
        overlay_legend=values["overlay_legend"],
        max_frame_age=float(values["max_frame_age"]),
        max_input_pixels=values["max_input_pixels"],
        depth=depth_settings(values),
    )


def validate_update(current: Mapping[str, Any], changes: Mapping[str, Any]) -> Settings:
    """Validate ``current`` with ``changes`` applied, refusing read-only and unknown names (an
    old name with its new one: ``crop was renamed dense.crop``)."""
    for name in changes:
        if name not in SPECS:
            raise ParameterError(renamed_reason(name) or f"unknown parameter {name!r}")
        if SPECS[name].read_only and changes[name] != current.get(name):
            raise ParameterError(f"{name} is read-only: restart the node to change it")
    merged = dict(current)
    merged.update({name: normalize(name, value) for name, value in changes.items()})
    return validate(merged)


def engine_config(values: Mapping[str, Any]) -> EngineConfig:
    """The engine configuration that the parameter values describe (dotted names; not yet
    validated): ``EngineConfig.from_flat`` of the engine's settings among ``values``."""
    config = {name: values[name] for name in ENGINE_FIELDS if name in values}
    for name, value in config.items():  # an integer given for a float: the float it means
        if SPECS[name].type == Parameter.Type.DOUBLE and type(value) is int:
            config[name] = float(value)
    if "background_words" in config:
        config["background_words"] = tuple(
            normalize("background_words", config["background_words"])
        )
    return EngineConfig.from_flat(config)
