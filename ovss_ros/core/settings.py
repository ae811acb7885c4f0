"""The settings machinery: one definition per setting, from which everything else is made.

Each method family owns its settings as a frozen dataclass (a ``Settings``) whose fields are
declared with ``setting()``: default, description, range or choices, whether it can change at
runtime, and where the default comes from. From these definitions come the node's parameter
declarations and checks (``ovss_ros.ros.parameter_table``), the tools' flags (``cli_flag``),
the params-file keys, ``--help``, ``config/ovss.yaml`` and the docs' parameter table.

Names: a family's settings live in its namespace (``pnp.layer``, ``dslo.sd.size``: ROS 2
namespaced parameters, nested in YAML); the shared ones are top level (``classes``, ``model``).
This module imports no torch, so flags and parameters are checked before any model library
is imported.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, get_type_hints

S = TypeVar("S", bound="Settings")


@dataclass(frozen=True)
class SettingInfo:
    """What a setting is and may be (the metadata of a ``setting()`` field).

    ``budget``: for a size-like setting whose maximum is the per-frame budget
    (``core.frame_budget``), the check that refuses a value above ``maximum`` with its cost
    (FrameBudgetError); ``open_minimum``: the value must be above ``minimum`` (``> 0``).
    """

    description: str
    runtime: bool = True  # False: chosen at start-up (a read-only node parameter)
    minimum: int | float | None = None
    maximum: int | float | None = None
    open_minimum: bool = False
    choices: tuple[str, ...] = ()
    constraints: str = ""  # more words for the docs and --help: "a multiple of the patch size"
    source: str = ""  # where the default comes from: "NACLIP clip/model.py", "ovss_ros"
    unit: str = ""  # "px", "s", ...
    budget: Callable[[Any], None] | None = None

    def range_text(self) -> str:
        """``[0, 2048]``, ``(0, 100]``; empty without a range."""
        if self.minimum is None:
            return ""
        low = "(" if self.open_minimum else "["
        return f"{low}{_number(self.minimum)}, {_number(self.maximum)}]"


def _number(value: int | float | None) -> str:
    """An integer as written (2147483647, not 2.14748e+09), a float in its short form."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def setting(default: Any, description: str, **info: Any) -> Any:
    """A settings field: ``default`` (a tuple for a list of strings) with its ``SettingInfo``."""
    return dataclasses.field(
        default=default, metadata={"info": SettingInfo(description, **info)}
    )


def group(settings: type[Settings]) -> Any:
    """A field holding a nested family's settings (``DsloSettings.sd``: ``dslo.sd.*``)."""
    return dataclasses.field(default_factory=settings, metadata={"group": settings})


@dataclass(frozen=True)
class ParameterDef:
    """One setting as a parameter: its full dotted name and everything known about it."""

    name: str  # "classes", "pnp.layer", "dslo.sd.size"
    type: type  # bool | int | float | str | tuple (a list of strings)
    default: Any
    info: SettingInfo
    owner: type[Settings]
    field: str  # the dataclass field in ``owner``


class Settings:
    """Base of every family's settings (a frozen dataclass with ``setting()`` fields)."""

    namespace: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ValueError for the first bad value, naming the full parameter name
        (``pnp.layer must be in [1, 1000], got 0``): types, ranges and choices from the
        metadata, then ``check()``'s cross-field rules; nested groups first."""
        for name, kind, info in _own_fields(type(self)):
            value = getattr(self, name)
            if info is None:
                value.validate()
                continue
            check(full_name(type(self), name), kind, info, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules of the family (override); ValueError."""

    def name(self, field: str) -> str:
        """The full parameter name of one of this class's fields: ``layer`` -> ``pnp.layer``."""
        return full_name(type(self), field)


def full_name(owner: type[Settings], field: str) -> str:
    return f"{owner.namespace}.{field}" if owner.namespace else field


def _own_fields(owner: type[Settings]) -> Iterator[tuple[str, type, SettingInfo | None]]:
    """(field, type, info) of ``owner``'s fields; info None for a nested group."""
    hints = get_type_hints(owner)
    for item in dataclasses.fields(owner):
        if "group" in item.metadata:
            yield item.name, item.metadata["group"], None
        elif "info" in item.metadata:
            yield item.name, _base_type(hints[item.name]), item.metadata["info"]


def _base_type(hint: Any) -> type:
    if hint in (bool, int, float, str):
        return hint
    return tuple  # tuple[str, ...]


def parameters(*owners: type[Settings]) -> list[ParameterDef]:
    """Every setting of ``owners`` as a ParameterDef, nested groups flattened, in declaration
    order (a group's settings where the group is declared)."""
    found: list[ParameterDef] = []
    for owner in owners:
        defaults = owner()
        for name, kind, info in _own_fields(owner):
            if info is None:
                found.extend(parameters(kind))
                continue
            found.append(
                ParameterDef(full_name(owner, name), kind, getattr(defaults, name), info, owner,
                             name)
            )
    return found


def cli_flag(name: str) -> str:
    """The tools' flag of a parameter: ``pnp.layer`` -> ``--pnp-layer``, ``dslo.sd.size`` ->
    ``--dslo-sd-size``, ``short_side`` -> ``--short-side``."""
    return "--" + name.replace(".", "-").replace("_", "-")


def check(name: str, kind: type, info: SettingInfo, value: Any) -> None:
    """The type, range and choices ``info`` gives, for ``value`` of parameter ``name``;
    ValueError naming it (a budget refusal gives the cost)."""
    if kind is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        for index, entry in enumerate(value):
            if not isinstance(entry, str):
                raise ValueError(f"{name} must be a list of strings: entry {index} is {entry!r}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        if info.choices and value not in info.choices:
            raise ValueError(f"unknown {name} {value!r}: use one of {list(info.choices)}")
        return
    wanted = "an integer" if kind is int else "a number"
    accepted = numbers.Integral if kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    if info.budget is not None and info.maximum is not None and value > info.maximum:
        info.budget(value)  # FrameBudgetError with the cost, if over the budget
    if info.minimum is None:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return
    low_ok = value > info.minimum if info.open_minimum else value >= info.minimum
    if not (low_ok and value <= info.maximum):
        unit = f" {info.unit}" if info.unit else ""
        raise ValueError(f"{name} must be in {info.range_text()}{unit}, got {value}")


def replaced(settings: S, changes: Mapping[str, Any]) -> S:
    """``settings`` with ``changes`` (keys: full dotted names within its namespace tree);
    not validated. KeyError for a name that is none of its settings."""
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    groups = {name: kind for name, kind, info in _own_fields(type(settings)) if info is None}
    plain = {name for name, _, info in _own_fields(type(settings)) if info is not None}
    for key, value in changes.items():
        for group_name, kind in groups.items():
            if key.startswith(kind.namespace + "."):
                nested.setdefault(group_name, {})[key] = value
                break
        else:
            prefix = f"{settings.namespace}." if settings.namespace else ""
            field = key[len(prefix):] if key.startswith(prefix) else None
            if field not in plain:
                raise KeyError(key)
            own[field] = tuple(value) if isinstance(value, list) else value
    for group_name, values in nested.items():
        own[group_name] = replaced(getattr(settings, group_name), values)
    return dataclasses.replace(settings, **own)


def flat(settings: Settings) -> dict[str, Any]:
    """Full dotted name -> value of every setting of ``settings`` (nested groups flattened)."""
    values: dict[str, Any] = {}
    for name, _, info in _own_fields(type(settings)):
        value = getattr(settings, name)
        if info is None:
            values.update(flat(value))
        else:
            values[full_name(type(settings), name)] = value
    return values
