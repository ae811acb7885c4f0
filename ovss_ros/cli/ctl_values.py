"""Parameter values for ``ovss-ctl``: a command-line text read as YAML (as ``ros2 param set``
reads it), then typed by the node's descriptor of the parameter, and a value printed back as
one YAML line (JSON's spelling, which YAML reads).

``typed_value("224", INTEGER)`` is 224, ``typed_value("1", DOUBLE)`` is 1.0 (``set
score_threshold 1`` sends a double), ``typed_value("1", STRING)`` is ``"1"``. A text that is no
value of the parameter's type raises ValueError naming the type.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml
from rcl_interfaces.msg import ParameterType

from ovss_ros.safe_yaml import load_yaml

TYPE_NAMES = {
    ParameterType.PARAMETER_BOOL: "a boolean (true or false)",
    ParameterType.PARAMETER_INTEGER: "an integer (64-bit)",
    ParameterType.PARAMETER_DOUBLE: "a number",
    ParameterType.PARAMETER_STRING: "a string",
    ParameterType.PARAMETER_BYTE_ARRAY: "a list of bytes",
    ParameterType.PARAMETER_BOOL_ARRAY: "a list of booleans",
    ParameterType.PARAMETER_INTEGER_ARRAY: "a list of integers (64-bit)",
    ParameterType.PARAMETER_DOUBLE_ARRAY: "a list of numbers",
    ParameterType.PARAMETER_STRING_ARRAY: "a list of strings, e.g. \"['a', 'b']\"",
}


def yaml_value(text: str) -> Any:
    """``text`` read as YAML (``ros2 param set``'s rule); text that is no YAML stays a string."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


INT64 = range(-(2**63), 2**63)  # a ROS integer parameter


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in INT64


def _number(value: Any) -> float | None:
    """``value`` as a finite float: a YAML number, or a text YAML 1.1 leaves a string that is
    one (``1e-1``, ``1e3``: ``float`` reads them as a ROS params file's YAML 1.2 does)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


def _is_number(value: Any) -> bool:
    return _number(value) is not None


def typed_value(text: str, parameter_type: int) -> Any:
    """The Python value of ``text`` for a parameter of ``parameter_type`` (rcl_interfaces
    ParameterType; NOT_SET: as YAML reads it, the node judges it). Raises ValueError."""
    if parameter_type == ParameterType.PARAMETER_STRING:
        return text
    value = yaml_value(text)
    if parameter_type == ParameterType.PARAMETER_NOT_SET:
        return value
    ok = {
        ParameterType.PARAMETER_BOOL: lambda v: isinstance(v, bool),
        ParameterType.PARAMETER_INTEGER: _is_int,
        ParameterType.PARAMETER_DOUBLE: _is_number,
    }
    items = {
        ParameterType.PARAMETER_BOOL_ARRAY: lambda v: isinstance(v, bool),
        ParameterType.PARAMETER_INTEGER_ARRAY: _is_int,
        ParameterType.PARAMETER_BYTE_ARRAY: lambda v: _is_int(v) and 0 <= v < 256,
        ParameterType.PARAMETER_DOUBLE_ARRAY: _is_number,
        ParameterType.PARAMETER_STRING_ARRAY: lambda v: isinstance(v, str),
    }
    if parameter_type in ok and ok[parameter_type](value):
        return _number(value) if parameter_type == ParameterType.PARAMETER_DOUBLE else value
    if (
        parameter_type in items
        and isinstance(value, list)
        and all(map(items[parameter_type], value))
    ):
        if parameter_type == ParameterType.PARAMETER_DOUBLE_ARRAY:
            return [_number(item) for item in value]
        if parameter_type == ParameterType.PARAMETER_BYTE_ARRAY:
            return [bytes([item]) for item in value]
        return value
    raise ValueError(f"takes {TYPE_NAMES.get(parameter_type, 'another type')}; got {text!r}")


def value_text(value: Any) -> str:
    """A parameter value as one YAML line: ``224``, ``0.5``, ``true``, ``"naclip"``,
    ``["cup", "door handle"]``."""
    if isinstance(value, (bytes, bytearray)):
        value = list(value)
    elif isinstance(value, (list, tuple)):
        value = [item[0] if isinstance(item, bytes) and len(item) == 1 else item for item in value]
    elif hasattr(value, "tolist"):  # array.array of integer / double arrays
        value = value.tolist()
    return json.dumps(value, ensure_ascii=False)
