"""One node parameter's description (``ParameterSpec``) and the type and range check of a value.

Types are checked here, not by rclpy, for every parameter (all are declared with dynamic typing
and their descriptor's type is put back after each request): rclpy's own refusal ("expected '3'
got '2'", or a start-up failure "expecting type 'DOUBLE'") names neither the parameter nor what it
wanted. ``check_value`` names the parameter, the type given (as ROS users see types: ``ros2 param
describe``) and the type or range expected; a maximum set by the per-frame budget
(``core.frame_budget``) is refused with its cost.
"""

from __future__ import annotations

import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter

from ovss_ros.ros.log_text import quoted

STRING_ARRAYS = ("cameras", "classes", "background_words")


class ParameterError(ValueError):
    """A parameter value was refused; ``str(error)`` is the reason given to the caller."""


@dataclass(frozen=True)
class ParameterSpec:
    """One node parameter: what it is, its default, and what values it may take."""

    name: str
    default: Any
    description: str
    read_only: bool = False
    minimum: float | None = None
    maximum: float | None = None
    constraints: str = ""
    # A maximum that the per-frame budget sets (``core.frame_budget``): a larger value is refused
    # by this check with its cost in the reason. rclpy would refuse it first with its own words
    # ("out of range") if the descriptor carried the range, so the range is in the constraints.
    budget: Callable[[Any], None] | None = None

    @property
    def type(self) -> Parameter.Type:
        if self.name in STRING_ARRAYS:
            return Parameter.Type.STRING_ARRAY
        return Parameter.Type.from_parameter_value(self.default)

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
            descriptor.additional_constraints = (
                f"{self.minimum} to {self.maximum} (the per-frame budget); " + self.constraints
            ).rstrip("; ")
        elif self.minimum is not None and isinstance(self.default, int):
            descriptor.integer_range = [
                IntegerRange(from_value=int(self.minimum), to_value=int(self.maximum), step=0)
            ]
        elif self.minimum is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=self.minimum, to_value=self.maximum, step=0.0)
            ]
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
    if spec.budget is not None and value > spec.maximum:
        try:
            spec.budget(value)
        except ValueError as error:  # FrameBudgetError: the cost of the value and the limit
            raise ParameterError(str(error)) from None
    if spec.minimum is not None and not spec.minimum <= value <= spec.maximum:
        raise ParameterError(
            f"{spec.name} must be in [{spec.minimum}, {spec.maximum}], got {value}"
        )
