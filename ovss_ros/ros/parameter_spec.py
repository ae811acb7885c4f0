"""One node parameter's description (``ParameterSpec``) and the type and range check of a value.

Types are checked here, not by rclpy, for every parameter (all are declared with dynamic typing
and their descriptor's type is put back after each request): rclpy's own refusal ("expected '3'
got '2'", or a start-up failure "expecting type 'DOUBLE'") names neither the parameter nor what it
wanted. ``check_value`` names the parameter, the type given (as ROS users see types: ``ros2 param
describe``) and the type, choices or range expected; a maximum set by the per-frame budget
(``core.frame_budget``) is refused with its cost. A spec is made from the setting's one
definition (``core.settings.ParameterDef``: ``setting()`` in the family's or the node's settings).
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter

from ovss_ros.core.settings import ParameterDef
from ovss_ros.ros.log_text import quoted


class ParameterError(ValueError):
    """A parameter value was refused; ``str(error)`` is the reason given to the caller."""


# Python type of a setting -> its ROS parameter type (a tuple of strings: a string array).
_ROS_TYPES = {
    bool: Parameter.Type.BOOL,
    int: Parameter.Type.INTEGER,
    float: Parameter.Type.DOUBLE,
    str: Parameter.Type.STRING,
    tuple: Parameter.Type.STRING_ARRAY,
}


@dataclass(frozen=True)
class ParameterSpec:
    """One node parameter, made from a setting's definition (``core.settings.ParameterDef``):
    its name, ROS type, default, description, range, choices and whether it is read-only."""

    definition: ParameterDef

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def default(self) -> Any:
        """The default as a ROS value: a tuple of strings as a list."""
        default = self.definition.default
        return list(default) if isinstance(default, tuple) else default

    @property
    def description(self) -> str:
        return self.definition.info.description

    @property
    def read_only(self) -> bool:
        return not self.definition.info.runtime

    @property
    def minimum(self) -> int | float | None:
        return self.definition.info.minimum

    @property
    def maximum(self) -> int | float | None:
        return self.definition.info.maximum

    @property
    def choices(self) -> tuple[str, ...]:
        return self.definition.info.choices

    @property
    def constraints(self) -> str:
        """The values in words: the choices (``a | b``), then the setting's constraints."""
        info = self.definition.info
        parts = [" | ".join(info.choices)] if info.choices else []
        return "; ".join(parts + ([info.constraints] if info.constraints else []))

    @property
    def budget(self) -> Callable[[Any], None] | None:
        """The check of a value above ``maximum`` against the per-frame budget (it raises a
        FrameBudgetError with the cost), for a maximum the budget sets; else None."""
        return self.definition.info.budget

    @property
    def type(self) -> Parameter.Type:
        return _ROS_TYPES[self.definition.type]

    def range_text(self) -> str:
        """``[0.0, 1.0]``, ``(0.0, 1000.0]`` (above the minimum); empty without a range."""
        if self.minimum is None:
            return ""
        low = "(" if self.definition.info.open_minimum else "["
        return f"{low}{self.minimum}, {self.maximum}]"

    def descriptor(self) -> ParameterDescriptor:
        """The descriptor rclpy enforces (type, read-only, range) and tools display."""
        descriptor = ParameterDescriptor(
            name=self.name,
            type=self.type.value,
            description=self.description,
            additional_constraints=self.constraints,
            read_only=self.read_only,
            # Types are checked here (check_value), not by rclpy, whose refusal ("expected '3'
            # got '2'") names neither the parameter nor the types; restore_types puts the type
            # that rclpy overwrites with the requested one back.
            dynamic_typing=True,
        )
        if self.budget is not None:
            # A maximum that the per-frame budget sets: a larger value is refused by
            # check_value with its cost in the reason. rclpy would refuse it first with its own
            # words ("out of range") if the descriptor carried the range, so the range is in
            # the constraints.
            descriptor.additional_constraints = (
                f"{self.minimum} to {self.maximum} (the per-frame budget); " + self.constraints
            ).rstrip("; ")
        elif self.minimum is not None and self.type == Parameter.Type.INTEGER:
            descriptor.integer_range = [
                IntegerRange(from_value=int(self.minimum), to_value=int(self.maximum), step=0)
            ]
        elif self.minimum is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(
                    from_value=float(self.minimum), to_value=float(self.maximum), step=0.0
                )
            ]
            if self.definition.info.open_minimum:
                descriptor.additional_constraints = (
                    f"> {self.minimum:g}; " + self.constraints
                ).rstrip("; ")
        return descriptor


# How a refusal names a type: as ROS users type and see them (ros2 param describe).
_TYPE_NAMES = {
    Parameter.Type.NOT_SET: "nothing (unset)",
    Parameter.Type.BOOL: "boolean",
    Parameter.Type.INTEGER: "integer",
    Parameter.Type.DOUBLE: "floating-point number",
    Parameter.Type.STRING: "string",
    Parameter.Type.BYTE_ARRAY: "byte array",
    Parameter.Type.BOOL_ARRAY: "list of booleans",
    Parameter.Type.INTEGER_ARRAY: "list of integers",
    Parameter.Type.DOUBLE_ARRAY: "list of floating-point numbers",
    Parameter.Type.STRING_ARRAY: "list of strings",
}
_EXPECTED = {
    Parameter.Type.BOOL: "a boolean (true or false)",
    Parameter.Type.INTEGER: "an integer",
    Parameter.Type.DOUBLE: "a floating-point number",
    Parameter.Type.STRING: "a string",
    Parameter.Type.STRING_ARRAY: "a list of strings (e.g. ['cat', 'dog'])",
}


def type_name(value: Any) -> str:
    """The ROS parameter type of a Python value, in words: ``1`` -> ``integer``."""
    if isinstance(value, array.array):
        value = list(value)
    try:
        return _TYPE_NAMES[Parameter.Type.from_parameter_value(value)]
    except TypeError:  # not a ROS parameter value (a list of mixed types, built in Python)
        return type(value).__name__


def check_value(spec: ParameterSpec, value: Any) -> None:
    """Type and range check; raise ParameterError naming the parameter, given and expected."""
    expected = spec.type
    if expected == Parameter.Type.STRING_ARRAY:
        if value is None:
            value = []
        if isinstance(value, array.array) or not isinstance(value, list | tuple):
            raise ParameterError(
                f"{spec.name} must be {_EXPECTED[expected]}, got {type_name(value)} "
                f"{quoted(value)}"
            )
        whole = type_name(list(value))
        if value and whole.startswith("list of") and whole != "list of strings":
            raise ParameterError(
                f"{spec.name} must be {_EXPECTED[expected]}, got {whole} {quoted(value)}"
            )
        for index, entry in enumerate(value):  # a list of mixed types (from Python)
            if not isinstance(entry, str):
                raise ParameterError(
                    f"{spec.name} must be {_EXPECTED[expected]}: entry {index} is "
                    f"{type_name(entry)} {quoted(entry)}"
                )
        return
    if (
        expected == Parameter.Type.DOUBLE
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        value = float(value)
    python_type = {
        Parameter.Type.BOOL: bool,
        Parameter.Type.INTEGER: int,
        Parameter.Type.DOUBLE: float,
        Parameter.Type.STRING: str,
    }[expected]
    wrong = not isinstance(value, python_type) or (python_type is int and isinstance(value, bool))
    if wrong:
        raise ParameterError(
            f"{spec.name} must be {_EXPECTED[expected]}, got {type_name(value)} {quoted(value)}"
        )
    if spec.choices and value not in spec.choices:
        raise ParameterError(f"unknown {spec.name} {value!r}: use one of {list(spec.choices)}")
    if python_type is float and not math.isfinite(value):
        raise ParameterError(f"{spec.name} must be in {spec.range_text()}, got {value}")
    if spec.budget is not None and value > spec.maximum:
        try:
            spec.budget(value)
        except ValueError as error:  # FrameBudgetError: the cost of the value and the limit
            raise ParameterError(str(error)) from None
    if spec.minimum is None:
        return
    above = value > spec.minimum if spec.definition.info.open_minimum else value >= spec.minimum
    if not (above and value <= spec.maximum):
        raise ParameterError(f"{spec.name} must be in {spec.range_text()}, got {value}")
