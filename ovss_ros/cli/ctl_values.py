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
    ParameterType.PARAMETER_INTEGER: "an integer",
    ParameterType.PARAMETER_DOUBLE: "a number",
    ParameterType.PARAMETER_STRING: "a string",
    ParameterType.PARAMETER_BYTE_ARRAY: "a list of bytes",
    ParameterType.PARAMETER_BOOL_ARRAY: "a list of booleans",
    ParameterType.PARAMETER_INTEGER_ARRAY: "a list of integers",
    ParameterType.PARAMETER_DOUBLE_ARRAY: "a list of numbers",
    ParameterType.PARAMETER_STRING_ARRAY: "a list of strings, e.g. \"['a', 'b']\"",
}


def yaml_value(text: str) -> Any:
    """``text`` read as YAML (``ros2 param set``'s rule); text that is no YAML stays a string."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(float(value))


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
        return float(value) if parameter_type == ParameterType.PARAMETER_DOUBLE else value
    if (
        parameter_type in items
        and isinstance(value, list)
        and all(map(items[parameter_type], value))
    ):
        if parameter_type == ParameterType.PARAMETER_DOUBLE_ARRAY:
            return [float(item) for item in value]
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
