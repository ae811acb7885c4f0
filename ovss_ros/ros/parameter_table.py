"""The node's parameter table, made from the settings' one definition.

Every engine setting (``core.config.SCHEMA``: the shared ones top level, each method family's
in its namespace, ``dense.crop``, ``pnp.layer``, ``dslo.sd.size``) and every node-only one
(``node_settings.NodeSettings``) is a parameter of that name, declared
(``parameters.declare_parameters``) with a descriptor made from its definition: type, default,
description, range, choices, read-only for what is chosen at start-up. ``--help``,
``config/ovss.yaml`` and the docs' table are made from this table too (``params_document``);
tests keep them equal.

The parameters of the releases before namespaced parameters (``crop``, ``pnp_layer``,
``sd_size``) are refused wherever they are given, with the new name (``core.config.RENAMED``).
"""

from __future__ import annotations

from ovss_ros.core.config import (
    LOAD_FIELDS,
    METHODS,
    PRECISIONS,
    RENAMED,
    SCHEMA,
    unknown_setting,
)
from ovss_ros.ros.node_settings import DEFAULT_CLASSES, IMAGE_TRANSPORTS, NODE_SCHEMA
from ovss_ros.ros.parameter_spec import ParameterSpec

__all__ = [
    "DEFAULT_CLASSES",
    "ENGINE_FIELDS",
    "IMAGE_TRANSPORTS",
    "METHODS",
    "PARAMETERS",
    "PRECISIONS",
    "READ_ONLY",
    "RENAMED",
    "RUNTIME_ENGINE_FIELDS",
    "SPECS",
    "STRING_ARRAYS",
    "renamed_reason",
]

_SHARED = [definition for definition in SCHEMA if "." not in definition.name]
_GROUPED = [definition for definition in SCHEMA if "." in definition.name]

# The shared engine settings, the node's own, then each family's namespace in turn.
PARAMETERS: tuple[ParameterSpec, ...] = tuple(
    ParameterSpec(definition) for definition in (*_SHARED, *NODE_SCHEMA, *_GROUPED)
)
SPECS: dict[str, ParameterSpec] = {spec.name: spec for spec in PARAMETERS}
STRING_ARRAYS = tuple(spec.name for spec in PARAMETERS if spec.definition.type is tuple)
ENGINE_FIELDS = tuple(definition.name for definition in SCHEMA)  # dotted names
READ_ONLY = tuple(spec.name for spec in PARAMETERS if spec.read_only)
# Engine settings the worker applies with Segmenter.update (the others choose the model).
RUNTIME_ENGINE_FIELDS = tuple(name for name in ENGINE_FIELDS if name not in LOAD_FIELDS)


def renamed_reason(name: str) -> str | None:
    """``crop was renamed dense.crop`` for a parameter name of an earlier release; else None."""
    return unknown_setting(name) if name in RENAMED else None
