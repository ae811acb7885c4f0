"""YAML and quoted values from files and requests, bounded (no torch, no ROS: the launch plan,
the tools and the core may all use it).

``load_yaml`` is PyYAML's safe loader without aliases and at most MAX_YAML_DEPTH levels deep: an
alias repeats a node, so a 1 kB params file of nested aliases expands to gigabytes in whatever
walks or prints it (ROS params files have no aliases: rcl's parser reads none); PyYAML composes
recursively, so a 100 kB file of ``[`` would end in a RecursionError instead of a YAML error.
``short_repr`` bounds what a message quotes of such data.

A key given twice in one mapping is read as rcl reads a params file where it can be: two
mappings under one key are merged (two ``dense:`` blocks); the same value twice is one value;
two different values for one key are refused (rcl would keep the last without a word).
``flatten_parameters`` makes dotted names of nested mappings, as rcl does, and refuses a name
given twice with different values (``dense.crop: 64`` beside ``dense: {crop: 32}``).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

import yaml

# A node params file is a few kB (config/ovss.yaml: 3 kB); anything far larger is not one.
MAX_PARAMS_FILE_BYTES = 1 << 20
# Nodes nested in a YAML document: a params file needs 4 (node, ros__parameters, a list, an entry).
MAX_YAML_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing aliases and nesting deeper than MAX_YAML_DEPTH."""

    depth = 0

    def compose_node(self, parent: object, index: object) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} (aliases are not allowed)", event.start_mark
            )
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """A mapping whose repeated keys are merged (mappings) or refused (different values)."""
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep)
        self.flatten_mapping(node)
        mapping: dict = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                ) from None
            value = self.construct_object(value_node, deep=True)
            if key in mapping:
                value = _merged(mapping[key], value, key, key_node.start_mark)
            mapping[key] = value
        return mapping


def _merged(first: Any, second: Any, key: Any, mark: yaml.Mark) -> Any:
    """The value of a key given twice: both mappings merged, or the one value both give."""
    if isinstance(first, dict) and isinstance(second, dict):
        merged = dict(first)
        for inner, value in second.items():
            merged[inner] = (
                _merged(merged[inner], value, inner, mark) if inner in merged else value
            )
        return merged
    if type(first) is type(second) and first == second:
        return first
    raise yaml.constructor.ConstructorError(
        None,
        None,
        f"key {short_repr(key)} is given twice with different values ({short_repr(first)} and "
        f"{short_repr(second)})",
        mark,
    )


def flatten_parameters(values: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """A params file's ``ros__parameters`` as rcl reads them: nested mappings are namespaces,
    ``{"dense": {"crop": 224}}`` -> ``{"dense.crop": 224}``. ValueError for a name given twice
    with different values (``dense.crop: 64`` beside ``dense: {crop: 32}``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        found = (
            flatten_parameters(value, f"{name}.") if isinstance(value, Mapping) else {name: value}
        )
        for inner, inner_value in found.items():
            if inner in flat and not (
                type(flat[inner]) is type(inner_value) and flat[inner] == inner_value
            ):
                raise ValueError(
                    f"{inner} is given twice with different values ({short_repr(flat[inner])} "
                    f"and {short_repr(inner_value)})"
                )
            flat[inner] = inner_value
    return flat


def load_yaml(text: str) -> object:
    """``yaml.safe_load(text)`` without aliases and at most MAX_YAML_DEPTH levels deep.

    Raises yaml.YAMLError for bad YAML, an alias or deeper nesting (the message names the line).
    """
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 3


def short_repr(value: object) -> str:
    """``repr(value)`` cut to 40 characters per part, three items per container and two levels
    (reprlib: a few hundred characters at most), for messages that quote data read from a file
    or a request."""
    return _SHORT.repr(value)
