"""The node's topic names checked before anything is created: camera names, mask topics, the
fixed input and output topics, resolved as the node resolves them (namespace, node name,
remapping) and held to rclpy's topic-name rules and rmw's length limit, so that a name ROS would
refuse ends start-up, or refuses a parameter change, with the reason (never a traceback later).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rclpy.validate_full_topic_name import validate_full_topic_name

from ovss_ros.core import ClassEntry
from ovss_ros.ros.log_text import quoted
from ovss_ros.ros.parameter_spec import ParameterError

# A ROS name token: letters, digits and '_', not starting with a digit, no '__' (rcl's rules).
CAMERA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# rmw's RMW_TOPIC_MAX_NAME_LENGTH (255 - 8: the DDS "rt/" prefix and more): rcl refuses longer.
TOPIC_MAX_LENGTH = 255 - 8


def parse_cameras(names: Sequence[str]) -> tuple[str, ...]:
    """Check the camera names: each becomes a topic namespace, so it must be one ROS name token.

    Raises ParameterError with the first problem (the node does not start).
    """
    for index, name in enumerate(names):
        if not name:
            raise ParameterError(f"cameras: entry {index} is empty; name every camera")
        if not CAMERA_NAME.fullmatch(name) or "__" in name:
            raise ParameterError(
                f"cameras: {name!r} is not a valid ROS name token: use letters, digits and "
                "single '_', not starting with a digit (e.g. front, rear_left)"
            )
    duplicates = sorted({name for name in names if list(names).count(name) > 1})
    if duplicates:
        raise ParameterError(f"cameras: duplicate names {duplicates}; name each camera once")
    return tuple(names)


def mask_topic(prefix: str, slug: str) -> str:
    """A camera's mask topic, relative: ``~/masks/chair``, ``~/front/masks/chair``."""
    return f"{prefix}masks/{slug}"


def check_mask_topics(
    classes: Sequence[ClassEntry], prefixes: Sequence[str], resolve: Callable[[str], str]
) -> None:
    """Refuse a vocabulary whose mask topics could not be created.

    Every class of every camera gets ``<prefix>masks/<slug>``; each is resolved as the node will
    resolve it (``resolve``: the node's ``resolve_topic_name``: namespace, node name, remapping)
    and checked with rclpy's topic-name rules (at most TOPIC_MAX_LENGTH characters).
    ``prefixes``: each camera's relative output prefix (``~/`` or ``~/front/``).
    Raises ParameterError naming the class and the problem.
    """
    for prefix in prefixes:
        for index, entry in enumerate(classes):
            problem = _topic_problem(mask_topic(prefix, entry.slug), resolve)
            if problem:
                raise ParameterError(f"classes: entry {index} {quoted(entry.name, 60)}: {problem}")


def check_node_topics(
    relatives: Sequence[str], resolve: Callable[[str], str], what: str = "cameras"
) -> None:
    """Refuse start-up when one of the node's fixed topics (outputs, inputs; ``relatives`` as
    the node creates them, e.g. ``~/front/label_info``) could not be created once resolved
    (namespace, node name, camera names, remapping). Raises ParameterError naming the topic."""
    for relative in relatives:
        problem = _topic_problem(
            relative, resolve, "topic", "shorten the namespace, the node name or the camera names"
        )
        if problem:
            raise ParameterError(f"{what}: {problem}")


def _topic_problem(
    relative: str,
    resolve: Callable[[str], str],
    kind: str = "mask topic",
    fix: str = "shorten the class name (its first synonym) or the node's namespace",
) -> str | None:
    """Why ``relative`` cannot be a topic of this node, or None."""
    try:
        validate_full_topic_name(resolve(relative))
        return None
    except Exception as error:  # rcl refuses some names while resolving them (RCLError)
        reason = str(error).splitlines()[0].split(", at /")[0]
    # rcl refuses a name that resolves too long without saying how long: measure it.
    head, _, tail = relative.rpartition("/")
    try:
        stem = resolve(f"{head}/x")[:-1]
    except Exception:
        stem = None
    if stem is not None and len(stem) + len(tail) > TOPIC_MAX_LENGTH:
        return (
            f"its {kind} {stem}{tail[:20]}... would be {len(stem) + len(tail)} characters "
            f"long, more than the {TOPIC_MAX_LENGTH} that ROS allows: {fix}"
        )
    return f"its {kind} {relative!r} is not a valid ROS topic name ({reason})"
