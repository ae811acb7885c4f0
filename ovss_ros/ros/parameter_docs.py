"""The node's params file (``config/ovss.yaml``) and the docs' parameter table, made from the
parameter table (``parameter_table.PARAMETERS``: the settings' one definition).

``params_yaml()`` is the text of ``config/ovss.yaml``: every parameter with its default, nested
by namespace (``dense: {crop: 0}``, as rcl reads ``dense.crop``), each with its description as a
comment. ``markdown_table()`` is the "Parameters" table of ``docs/ros_interface.md``, one table
per namespace. Tests keep both files equal to what these return; ``python -m
ovss_ros.ros.parameter_docs --write`` rewrites them after a setting changes.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from ovss_ros.ros.parameter_spec import ParameterSpec
from ovss_ros.ros.parameter_table import PARAMETERS, RENAMED

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "config" / "ovss.yaml"
CONTRACT = REPO / "docs" / "ros_interface.md"
TABLE_START = "<!-- parameter table: made by python -m ovss_ros.ros.parameter_docs --write -->"
TABLE_END = "<!-- end of the parameter table -->"

# Namespace -> what its table is about (a namespace not named here is titled by its name).
GROUP_TITLES = {
    "": "Top level: shared by every method, and the node's own",
    "dense": "`dense.*`: the dense CLIP family (method naclip ... vanilla, the *_freecp variants)",
    "dslo": "`dslo.*`: DSLO (refinement dslo)",
    "dslo.sd": "`dslo.sd.*`: DSLO's Stable Diffusion 2 affinity (dslo.affinity sd2)",
    "freecp": "`freecp.*`: FreeCP (refinement freecp)",
    "pnp": "`pnp.*`: PnP-OVSS (method pnp_ovss)",
    "deop": "`deop.*`: DeOP, and the proposals of the two-stream baseline and superpixel_clip "
    "(method deop, twostream, superpixel_clip)",
    "twostream": "`twostream.*`: the two-stream baseline (method twostream)",
    "superpixel_clip": "`superpixel_clip.*`: the training-free superpixel_clip (method "
    "superpixel_clip)",
}

HEADER = """\
# Defaults of every ovss node parameter, made from the settings' definitions
# (python -m ovss_ros.ros.parameter_docs --write; a test keeps this file equal to them).
# `ros2 param describe /ovss <name>` and `ovss_node --help` say the same.
# Use: ros2 run ovss_ros ovss_node --ros-args --params-file config/ovss.yaml
# (ovss_lifecycle_node reads the same file.) `/**` applies it to the node whatever its name and
# namespace, e.g. after `-r __ns:=/front_camera` or `-r __node:=ovss_front`.
# A method's parameters are in its namespace, nested here (dense: crop: 224 is dense.crop;
# -p dense.crop:=224 on the command line). The flat names of earlier releases (crop, pnp_layer,
# sd_size, ...) are refused with their new names; any other name that is not a parameter is
# ignored, with a start-up warning naming the closest real one.
# A floating-point parameter also takes an integer (overlay_alpha: 1 is 1.0).
# Images larger than 512 KiB (640x480 rgb8 and up) are lost between processes with default Fast
# DDS settings: set FASTDDS_DEFAULT_PROFILES_FILE to this folder's fastdds_large_data.xml in the
# camera driver and the node (the launch file does it for the node); Cyclone DDS: see README.
/**:
  ros__parameters:
"""

FOOTER = """\
    # QoS can be overridden per topic (absolute names, after remapping and namespaces).
    # Inputs (image, image/compressed; default BEST_EFFORT, KEEP_LAST 1): history, depth,
    # reliability. Outputs (default RELIABLE, KEEP_LAST 5; label_info TRANSIENT_LOCAL depth 1):
    # history, depth, reliability, durability; the mask topics follow ~/labels. E.g.:
    # qos_overrides:
    #   /image:
    #     subscription:
    #       reliability: reliable
    #       depth: 1
    #   /ovss/labels:
    #     publisher:
    #       reliability: best_effort
    #       depth: 1
"""


def namespace(spec: ParameterSpec) -> str:
    """``dslo.sd`` for ``dslo.sd.size``; "" for a top-level parameter."""
    return spec.name.rpartition(".")[0]


def values_text(spec: ParameterSpec) -> str:
    """The values a parameter takes, in words: its range (with the per-frame budget, or the
    open minimum), its choices, its constraints."""
    parts = []
    if spec.minimum is not None:
        note = " (the per-frame budget)" if spec.budget is not None else ""
        parts.append(f"{spec.range_text()}{note}")
    if spec.constraints:
        parts.append(spec.constraints)
    return "; ".join(parts)


def _value(value: Any) -> str:
    """A value as YAML (written as JSON: strings stay strings) and as the docs show it."""
    return json.dumps(value)


def params_yaml() -> str:
    """The text of ``config/ovss.yaml``: every parameter's default, nested by namespace."""
    lines = [HEADER.rstrip("\n")]
    opened: list[str] = []  # the namespace path written so far
    for spec in PARAMETERS:
        path = spec.name.split(".")
        groups, leaf = path[:-1], path[-1]
        common = 0
        while common < min(len(opened), len(groups)) and opened[common] == groups[common]:
            common += 1
        for depth in range(common, len(groups)):
            indent = "    " + "  " * depth
            title = GROUP_TITLES.get(".".join(groups[: depth + 1]), "")
            lines.append("")
            if title:
                lines.append(f"{indent}# {title.replace('`', '')}")
            lines.append(f"{indent}{groups[depth]}:")
        opened = groups
        indent = "    " + "  " * len(groups)
        facts = ["start-up" if spec.read_only else "runtime"]
        if values_text(spec):
            facts.append(values_text(spec))
        comment = f"{spec.description} ({'; '.join(facts)})"
        lines += textwrap.wrap(
            comment, 99, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "
        )
        lines.append(f"{indent}{leaf}: {_value(spec.default)}")
    return "\n".join(lines) + "\n\n" + FOOTER


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The docs' parameter tables, one per namespace, between the TABLE_START/END markers."""
    lines = [TABLE_START]
    current = None
    for spec in PARAMETERS:
        group = namespace(spec)
        if group != current:
            current = group
            lines += [
                "",
                f"### {GROUP_TITLES.get(group, f'`{group}.*`')}",
                "",
                "| parameter | default | set at | values | meaning | default from |",
                "|---|---|---|---|---|---|",
            ]
        cells = [
            f"`{spec.name}`",
            f"`{_value(spec.default)}`",
            "start-up" if spec.read_only else "runtime",
            _cell(values_text(spec)),
            _cell(spec.description),
            _cell(spec.definition.info.source),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    renamed = ", ".join(f"`{old}` -> `{new}`" for old, new in RENAMED.items())
    lines += [
        "",
        "The flat names of earlier releases are refused, at start-up (`-p`, a params file, the "
        "launch file) and at runtime (`ros2 param set`), with their new names in the reason "
        f"(`crop was renamed dense.crop`): {renamed}.",
        "",
        TABLE_END,
    ]
    return "\n".join(lines)


def documented_table(text: str) -> str:
    """The parameter table as ``docs/ros_interface.md`` holds it (between the markers)."""
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    return text[start:end]


def write() -> None:
    """Rewrite ``config/ovss.yaml`` and the docs' table from the settings' definitions."""
    PARAMS_FILE.write_text(params_yaml())
    text = CONTRACT.read_text()
    CONTRACT.write_text(text.replace(documented_table(text), markdown_table()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the two files")
    if parser.parse_args().write:
        write()
    else:
        print(params_yaml())


if __name__ == "__main__":
    main()
