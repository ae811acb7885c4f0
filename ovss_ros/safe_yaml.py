"""YAML and quoted values from files and requests, bounded (no torch, no ROS: the launch plan,
the tools and the core may all use it).

``load_yaml`` is PyYAML's safe loader without aliases and at most MAX_YAML_DEPTH levels deep: an
alias repeats a node, so a 1 kB params file of nested aliases expands to gigabytes in whatever
walks or prints it (ROS params files have no aliases: rcl's parser reads none); PyYAML composes
recursively, so a 100 kB file of ``[`` would end in a RecursionError instead of a YAML error.
``short_repr`` bounds what a message quotes of such data.
"""

from __future__ import annotations

import reprlib

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
