"""The engine's settings as command-line flags, made from the settings schema for every tool.

Each setting of ``core.config.SCHEMA`` a tool takes becomes one flag, named by
``core.settings.cli_flag`` (``dense.crop`` -> ``--dense-crop``, ``dslo.sd.size`` ->
``--dslo-sd-size``, ``short_side`` -> ``--short-side``), with the setting's type, default,
choices and description (its range and whether the node can change it at runtime in
``--help``); a value is checked by the schema's own check (``core.settings.check``) as it is
parsed, so a bad one ends the tool with one line naming the flag and status 2. A flag of an
earlier release is refused with its new name (``--crop was renamed --dense-crop``).

``--params-file`` reads engine settings from a YAML file, as the flags' defaults (flags given on
the command line override them): the node's params file (``/**: ros__parameters: {...}``,
``config/ovss.yaml``, ``config/dslo_paper.yaml``) or the parameters alone, nested by
namespace (``dslo: {sd: {size: 512}}`` is ``dslo.sd.size``). Its node-only parameters
(classes, topics, publishing) are left out; an old flat name is refused with the new one.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ovss_ros.cli.tool_parser import ToolParser
from ovss_ros.core.config import NAMES, RENAMED, SCHEMA, EngineConfig, unknown_setting
from ovss_ros.core.file_checks import read_text
from ovss_ros.core.settings import ParameterDef, check, cli_flag
from ovss_ros.ros.launch_plan import NODE_NAME, node_key_matches
from ovss_ros.ros.node_settings import NODE_SCHEMA
from ovss_ros.safe_yaml import MAX_PARAMS_FILE_BYTES, flatten_parameters, load_yaml, short_repr

# Flags of earlier releases -> the flag that replaced them (argparse would only say
# "unrecognized arguments"): every renamed setting's, and the three whose flag was not the
# setting's name.
RENAMED_FLAGS: dict[str, str] = {
    cli_flag(old): cli_flag(new) for old, new in RENAMED.items() if cli_flag(old) != cli_flag(new)
}
RENAMED_FLAGS |= {
    "--size": cli_flag("short_side"),
    "--threshold": cli_flag("score_threshold"),
    "--background": cli_flag("background_words"),
}
RENAMED_FLAGS |= {  # the negative form of the on/off flags
    "--no-" + old[2:]: "--no-" + new[2:]
    for old, new in list(RENAMED_FLAGS.items())
    if next(p for p in SCHEMA if cli_flag(p.name) == new).type is bool
}
LIST_SEPARATOR = ";"  # a list setting's flag: its strings joined by ';' ("sky;wall")


def engine_parameters(names: Iterable[str] | None = None) -> list[ParameterDef]:
    """The schema's settings called ``names`` (all of them for None), in schema order;
    KeyError for a name that is no setting."""
    if names is None:
        return list(SCHEMA)
    wanted = set(names)
    unknown = wanted - NAMES
    if unknown:
        raise KeyError(f"no such settings: {sorted(unknown)}")
    return [p for p in SCHEMA if p.name in wanted]


def flag_help(definition: ParameterDef) -> str:
    """``--help`` of a setting's flag: its description, range, constraints and the default in
    force (argparse's ``%(default)r``; a list of strings as the flag takes it)."""
    info = definition.info
    parts = [info.description]
    if info.range_text():
        parts.append(f"range {info.range_text()}" + (f" {info.unit}" if info.unit else ""))
    if info.constraints:
        parts.append(info.constraints)
    if definition.type is tuple:
        parts.append(f"strings separated by {LIST_SEPARATOR!r}")
    text = "; ".join(parts).replace("%", "%%")
    if definition.type is tuple:
        shown = LIST_SEPARATOR.join(definition.default) if definition.default else "none"
        return f"{text} (default: {shown})".replace("%(", "%%(")
    return f"{text} (default: %(default)r)"


def value_parser(definition: ParameterDef):
    """argparse ``type`` of a setting's flag: the text as the setting's type, checked by the
    schema (``core.settings.check``); ArgumentTypeError naming the setting."""
    kind, name = definition.type, definition.name

    def parse(text: str) -> Any:
        if kind is tuple:
            value: Any = tuple(w.strip() for w in text.split(LIST_SEPARATOR) if w.strip())
        elif kind is str:
            value = text
        else:
            try:
                value = kind(text)
            except ValueError:
                wanted = "an integer" if kind is int else "a number"
                raise argparse.ArgumentTypeError(
                    f"{name} must be {wanted}, got {text!r}"
                ) from None
        try:
            check(name, kind, definition.info, value)
        except ValueError as error:  # FrameBudgetError too: the cost, in the reason
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def add_engine_arguments(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    params_file: bool = True,
) -> None:
    """Add a flag for each engine setting ``names`` lists (every one for None), grouped by
    namespace, with the schema's defaults unless ``defaults`` (full dotted names) gives
    others; the flag's dest is the setting's full name (``args.__dict__["dense.crop"]``,
    ``config_from_args``). With ``params_file``, ``--params-file`` too (``parse_engine_args``
    reads it). A ToolParser learns the old flags to refuse with their new names."""
    defaults = dict(defaults or {})
    unknown = set(defaults) - NAMES
    if unknown:
        raise KeyError(f"defaults for no such settings: {sorted(unknown)}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for definition in engine_parameters(names):
        namespace = definition.owner.namespace
        if namespace not in groups:
            title = f"{namespace}.* settings" if namespace else "engine settings"
            groups[namespace] = parser.add_argument_group(title)
        options: dict[str, Any] = {
            "dest": definition.name,
            "default": defaults.get(definition.name, definition.default),
            "help": flag_help(definition),
        }
        if definition.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = value_parser(definition)
            options["metavar"] = definition.name.rsplit(".", 1)[-1].upper()
        if definition.info.choices:
            options["choices"] = list(definition.info.choices)
            options.pop("metavar")
        groups[namespace].add_argument(cli_flag(definition.name), **options)
    if params_file:
        parser.add_argument(
            "--params-file",
            type=Path,
            help="YAML file of engine settings (a node params file such as "
            "config/dslo_paper.yaml, or the settings nested by namespace): the defaults of "
            "these flags; flags given override them",
        )
    if isinstance(parser, ToolParser):
        parser.renamed_flags |= RENAMED_FLAGS


def engine_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Setting name -> the parser's action for it (what ``add_engine_arguments`` added)."""
    return {action.dest: action for action in parser._actions if action.dest in NAMES}


def _parameters_section(document: object, path: Path) -> dict[str, Any]:
    """The parameters a params file gives the ovss node (dotted names): the ``ros__parameters``
    of every node key that matches ``/ovss`` as rcl matches them (``/**``, ``ovss``, ``/*``...),
    later ones winning as in rcl; or, without any ``ros__parameters``, the document itself.
    ValueError: not a mapping, sections for other nodes only, a name given twice."""
    where = f"params file {str(path)!r}"
    if not isinstance(document, dict):
        raise ValueError(
            f"{where} must be a mapping: one node's ros__parameters (/**: ros__parameters: "
            "...) or the settings nested by namespace"
        )
    sections = {
        str(key): entry["ros__parameters"]
        for key, entry in document.items()
        if isinstance(entry, dict) and "ros__parameters" in entry
    }
    if not sections:
        return _flat(document, where)
    ours = [key for key in sections if node_key_matches(key, f"/{NODE_NAME}")]
    if not ours:
        raise ValueError(
            f"{where} has ros__parameters only for other nodes ({short_repr(list(sections))}): "
            f"none for the {NODE_NAME} node (/** or {NODE_NAME})"
        )
    found: dict[str, Any] = {}
    for key in ours:  # other nodes' sections are ignored, as the node ignores them
        if not isinstance(sections[key], dict):
            raise ValueError(f"{where}: {key}: ros__parameters must be a mapping")
        found |= _flat(sections[key], where)
    return found


def _flat(values: dict[Any, Any], where: str) -> dict[str, Any]:
    try:
        return flatten_parameters(values)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def params_file_values(path: Path) -> dict[str, Any]:
    """The engine settings of a params file by full dotted name, each checked by the schema.

    Raises ValueError naming the problem: missing, not a regular file, larger than
    MAX_PARAMS_FILE_BYTES, not YAML, not one node's parameters, an old flat name (``crop was
    renamed dense.crop``), an unknown parameter, a bad value (type, range, choices).
    """
    try:
        document = load_yaml(read_text(path, "params file", MAX_PARAMS_FILE_BYTES))
    except yaml.YAMLError as error:
        raise ValueError(
            f"params file {str(path)!r} cannot be read: {' '.join(str(error).split())}"
        ) from None
    node_only = {definition.name for definition in NODE_SCHEMA}  # the node's own settings
    definitions = {p.name: p for p in SCHEMA}
    values: dict[str, Any] = {}
    for name, value in _parameters_section(document, path).items():
        where = f"params file {str(path)!r}"
        if name in RENAMED:
            raise ValueError(f"{where}: {unknown_setting(name)}")
        if name not in definitions:
            if name in node_only:
                continue  # a node-only parameter
            raise ValueError(f"{where}: unknown parameter {short_repr(name)}")
        definition = definitions[name]
        if definition.type is float and type(value) is int:
            value = float(value)  # as the node takes 1 for 1.0
        try:
            check(name, definition.type, definition.info, value)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        values[name] = tuple(value) if definition.type is tuple else value
    return values


def params_file_defaults(path: Path) -> dict[str, Any]:
    """Flag defaults (argparse dests: the full setting names) from a params file
    (``params_file_values``); ValueError as it."""
    return params_file_values(path)


def parse_engine_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the ``--params-file`` settings as the defaults (only
    the settings the parser has flags for)."""
    first = ToolParser(add_help=False, prog=parser.prog)
    first.add_argument("--params-file", type=Path)
    known, _ = first.parse_known_args(argv)
    if known.params_file is not None:
        try:
            values = params_file_defaults(known.params_file)
        except ValueError as error:
            parser.error(str(error))
        flags = engine_flags(parser)
        parser.set_defaults(**{name: v for name, v in values.items() if name in flags})
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags (the settings without a flag keep their defaults); not
    validated: EngineConfig.validate reports bad combinations."""
    given = vars(args)
    return EngineConfig.from_flat({name: given[name] for name in NAMES if name in given})
