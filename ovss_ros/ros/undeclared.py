"""Parameter names the node does not declare: warned about at start-up, refused at runtime.

rclpy ignores a start-up value (``-p``, ``--params-file``) for a parameter the node does not
declare without a word, and refuses a runtime request naming one with "Invalid access to
undeclared parameter(s): []" (its list comes out empty). The node names each such parameter and
the closest declared one instead (``difflib.get_close_matches``: a typo gets its fix).

A name of an earlier release (``crop``, now ``dense.crop``: ``core.config.RENAMED``) is refused
with its new name, at start-up too: the node does not start with a value it would ignore.
"""

from __future__ import annotations

import difflib

from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import ParameterNotDeclaredException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ovss_ros.ros.log_text import one_line
from ovss_ros.ros.parameter_spec import ParameterError
from ovss_ros.ros.parameter_table import renamed_reason

QOS_PREFIX = "qos_overrides."


def undeclared_overrides(given: list[str], declared: list[str]) -> list[tuple[str, str | None]]:
    """Each name in ``given`` that is not in ``declared``, with the closest declared name
    (``difflib.get_close_matches``, cutoff 0.6), or None when nothing is close."""
    known = set(declared)
    return [
        (name, next(iter(difflib.get_close_matches(name, declared, n=1, cutoff=0.6)), None))
        for name in given
        if name not in known
    ]


def undeclared_message(name: str, closest: str | None) -> str:
    """Why ``name`` is no parameter: renamed (``crop was renamed dense.crop``), or unknown with
    the closest declared name."""
    renamed = renamed_reason(name)
    if renamed is not None:
        return renamed
    hint = f"did you mean {closest}?" if closest else "no parameter of that name exists"
    return f"{one_line(name, 120)} is not a parameter of this node: {hint}"


class UndeclaredParameters(ParameterNotDeclaredException):
    """A request names parameters the node does not declare. rclpy's own refusal says
    "Invalid access to undeclared parameter(s): []" (its list comes out empty); this one names
    each parameter and the closest declared one (``undeclared_overrides``)."""

    def __init__(self, found: list[tuple[str, str | None]]) -> None:
        super().__init__([name for name, _ in found])
        self.args = ("; ".join(undeclared_message(name, closest) for name, closest in found),)


def refuse_renamed_overrides(node: Node) -> None:
    """Raise ParameterError if a start-up value (-p, --params-file) names a parameter of an
    earlier release (``crop was renamed dense.crop``; every such name, in one reason)."""
    # rclpy keeps the start-up values here and offers no public accessor.
    given = list(getattr(node, "_parameter_overrides", {}))
    reasons = [reason for reason in map(renamed_reason, given) if reason is not None]
    if reasons:
        raise ParameterError("; ".join(reasons))


def report_undeclared_overrides(node: Node, reported: set[str], qos: bool) -> None:
    """Warn about every parameter given at start-up (-p, --params-file) that ``node`` does not
    declare, naming the closest declared one: rclpy ignores such a value without a word.

    ``qos``: include ``qos_overrides.*`` names, which rclpy declares only as the publishers
    and subscriptions they configure are created (so: once the inputs are subscribed).
    Each name is reported once (``reported``: the names reported so far, updated).
    """
    declared = list(node._parameters)  # rclpy's own too (use_sim_time, ...)
    # rclpy keeps the start-up values here and offers no public accessor.
    given = list(getattr(node, "_parameter_overrides", {}))
    for name, closest in undeclared_overrides(given, declared):
        if name in reported or (name.startswith(QOS_PREFIX) and not qos):
            continue
        reported.add(name)
        node.get_logger().warning(
            f"parameter {undeclared_message(name, closest)} (the value is ignored)"
        )


def refuse_undeclared(node: Node, parameter_list: list[Parameter]) -> None:
    """Raise ``UndeclaredParameters`` if ``parameter_list`` names a parameter ``node`` does not
    declare (before rclpy's own set_parameters, which would refuse it without the names)."""
    names = [getattr(parameter, "name", None) for parameter in parameter_list]
    if None in names:  # not Parameters: rclpy's own TypeError says so
        return
    found = undeclared_overrides(names, list(node._parameters))
    if found:
        raise UndeclaredParameters(found)


class UndeclaredRefusal:
    """Mixed in before rclpy's Node: ``set_parameters`` and ``set_parameters_atomically`` refuse
    a list with an undeclared name whole (``UndeclaredParameters``, which the parameter services
    turn into an unsuccessful result with its message), then do what rclpy's do."""

    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        refuse_undeclared(self, parameter_list)  # type: ignore[arg-type]
        return super().set_parameters(parameter_list)  # type: ignore[misc]

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        refuse_undeclared(self, parameter_list)  # type: ignore[arg-type]
        return super().set_parameters_atomically(parameter_list)  # type: ignore[misc]
