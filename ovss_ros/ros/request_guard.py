"""Nothing that arrives over DDS ends the node (issue 18, item 2).

rclpy runs each callback inside ``spin_once`` and raises whatever the callback raised out of
``spin_once``: one exception in any callback (a service, a subscription, a timer, a guard
condition) ends a spin loop that does not catch it, and the process with it. Any process on the
graph can send such a request: rclpy's own parameter services turn each request's
``rcl_interfaces/ParameterValue`` into a ``Parameter`` with ``Parameter.from_parameter_msg``,
outside their ``try``, and a ``type`` byte outside 0-9 raises ``ValueError`` there (rclcpp had
the same hole, fixed in ros2/rclcpp#3256 by catching every exception and answering with an
unsuccessful result). A /clock message with a negative time raises in rclpy's TimeSource
(with ``use_sim_time``).

Two layers, so that the node always answers and always goes on:

- ``guard_services``: every service of the node (rclpy's parameter services, the lifecycle
  services, ``~/get_type_description``, ``~/enable``) answers; a callback that raises gets a
  refusal with the reason where the response has a field for one (``successful``/``reason``
  of SetParametersResult, ``success``/``message``), an empty response otherwise (what rclpy's
  describe/get/list services answer for an undeclared name). The two set services are replaced
  (``SetParameterServices``): each parameter is converted inside the boundary, a type byte
  outside 0-9 is refused with its name and the types there are, and the plain set service keeps
  judging each parameter on its own, as ROS defines it. A request with more than
  MAX_REQUEST_ENTRIES names, prefixes or parameters is refused before it is handled (a
  ``describe_parameters`` of a million names held the executor for 19 s).
- the node's spin loop (``ovss_ros.ros.node.spin_until_stopped``) survives an exception out of
  ``spin_once`` (a subscription or timer callback, the executor itself) and goes on.

Both report to ``CallbackFaults``: each kind (where, exception type) is logged once, every one
is counted, and /diagnostics shows the count (``callback errors``) and a WARN while recent.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.msg import ParameterType, SetParametersResult
from rcl_interfaces.srv import SetParameters, SetParametersAtomically
from rclpy.exceptions import ParameterNotDeclaredException
from rclpy.parameter import Parameter

from ovss_ros.ros.diagnostics import WINDOW_S
from ovss_ros.ros.log_text import describe, one_line

# ParameterType constants: the only type bytes a ParameterValue may carry.
PARAMETER_TYPES = {
    value: name.removeprefix("PARAMETER_").lower()
    for name, value in vars(ParameterType).items()
    if name.startswith("PARAMETER_") and isinstance(value, int)
}
# /diagnostics: callback errors within its window make the status WARN.
RECENT_S = WINDOW_S
# Entries of one request (names, prefixes, parameters): the node has about 100 parameters, so a
# client never needs more; beyond it a request is refused before it is handled.
MAX_REQUEST_ENTRIES = 10_000


class MalformedRequest(ValueError):
    """A request field no ROS client sends (e.g. a parameter type byte outside 0-9)."""


class CallbackFaults:
    """Exceptions raised in the node's callbacks: counted, each kind logged once.

    ``log``: called with one line for the first exception of each kind (where, exception
    type). Thread-safe (the executor reports; the diagnostics timer reads).
    """

    def __init__(self, log: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self._log = log
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: set[tuple[str, str]] = set()
        self._times: deque[float] = deque()
        self.total = 0

    def record(self, where: str, error: BaseException) -> None:
        kind = (where, type(error).__name__)
        with self._lock:
            self.total += 1
            self._times.append(self._clock())
            first = kind not in self._kinds
            self._kinds.add(kind)
        if first:
            try:
                self._log(
                    f"{where}: {describe(error)} (the node goes on; further errors of this kind "
                    "are counted in /diagnostics, 'callback errors', not logged)"
                )
            except Exception:  # reporting must never be what ends the node
                pass

    def refused(self, kind: str, text: str) -> None:
        """A request refused as invalid (no error): logged once per ``kind``, not counted."""
        with self._lock:
            first = ("refused", kind) not in self._kinds
            self._kinds.add(("refused", kind))
        if first:
            try:
                self._log(f"{text} (further such requests are refused without a log line)")
            except Exception:
                pass

    def recent(self, window_s: float = RECENT_S) -> int:
        """How many were recorded within the last ``window_s`` seconds."""
        with self._lock:
            start = self._clock() - window_s
            while self._times and self._times[0] < start:
                self._times.popleft()
            return len(self._times)


def parameter_from_message(message: Any) -> Parameter:
    """``Parameter.from_parameter_msg`` for a request from anyone: raises MalformedRequest
    (naming the parameter) for a type byte that is no ROS parameter type, or for a value
    rclpy cannot turn into a Parameter, instead of whatever rclpy raises."""
    name = one_line(str(message.name), 120)
    type_id = message.value.type
    if type_id not in PARAMETER_TYPES:
        known = ", ".join(f"{value} {kind}" for value, kind in sorted(PARAMETER_TYPES.items()))
        raise MalformedRequest(
            f"parameter {name!r}: value type {type_id} is not a ROS parameter type ({known})"
        )
    try:
        return Parameter.from_parameter_msg(message)
    except Exception as error:
        raise MalformedRequest(f"parameter {name!r}: {describe(error)}") from error


class SetParameterServices:
    """The callbacks of ``~/set_parameters`` and ``~/set_parameters_atomically`` that never
    raise: what rclpy's ParameterService does, with every step inside the boundary."""

    def __init__(self, node: Any, faults: CallbackFaults) -> None:
        self._node = node
        self._faults = faults

    def set_parameters(
        self, request: SetParameters.Request, response: SetParameters.Response
    ) -> SetParameters.Response:
        """Each parameter on its own (as ROS defines this service): one refused (malformed,
        undeclared, invalid) costs the others nothing."""
        for message in request.parameters:
            response.results.append(self._set([message], "set_parameters"))
        return response

    def set_parameters_atomically(
        self,
        request: SetParametersAtomically.Request,
        response: SetParametersAtomically.Response,
    ) -> SetParametersAtomically.Response:
        """All or nothing: one malformed parameter refuses the whole request."""
        response.result = self._set(list(request.parameters), "set_parameters_atomically")
        return response

    def _set(self, messages: list[Any], service: str) -> SetParametersResult:
        try:
            parameters = [parameter_from_message(message) for message in messages]
        except MalformedRequest as error:
            self._faults.record(f"{service}: malformed request", error)
            return SetParametersResult(successful=False, reason=one_line(str(error)))
        try:
            return self._node.set_parameters_atomically(parameters)
        except ParameterNotDeclaredException as error:
            return SetParametersResult(successful=False, reason=one_line(str(error)))
        except Exception as error:
            self._faults.record(service, error)
            return SetParametersResult(
                successful=False, reason=f"the request could not be handled: {describe(error)}"
            )


class ChangeStateGuard:
    """``~/change_state`` of a managed node that refuses a transition the state machine does
    not offer from its current state before rclpy sees it: rclpy logs an ERROR line (and rcl a
    WARN) for each such request, so a peer could flood the log. Logged once here instead; the
    answer is the same (``success`` false)."""

    def __init__(self, node: Any, callback: Callable[[Any, Any], Any], faults: CallbackFaults):
        self._node = node
        self._callback = callback
        self._faults = faults

    def __call__(self, request: Any, response: Any) -> Any:
        transition = request.transition
        offered = self._node._state_machine.available_transitions  # (id, label, ...) each
        if transition.label:
            valid = any(entry[1] == transition.label for entry in offered)
            asked = f"label {one_line(transition.label, 80)!r}"
        else:
            valid = any(entry[0] == transition.id for entry in offered)
            asked = f"id {transition.id}"
        if valid:
            return self._callback(request, response)
        state = self._node._state_machine.current_state[1]
        self._faults.refused(
            "change_state",
            f"change_state: no transition {asked} from state {state}: refused",
        )
        response.success = False
        return response


def refusal(srv_type: Any, request: Any, reason: str) -> Any:
    """A response of ``srv_type`` that refuses ``request`` with ``reason`` where the type has a
    place for one (SetParameters: one unsuccessful result per parameter); empty otherwise."""
    response = srv_type.Response()
    result = SetParametersResult(successful=False, reason=one_line(reason))
    if srv_type is SetParameters:
        response.results = [result for _ in getattr(request, "parameters", [])]
        return response
    if srv_type is SetParametersAtomically:
        response.result = result
        return response
    for flag in ("success", "successful"):
        if hasattr(response, flag) and isinstance(getattr(response, flag), bool):
            setattr(response, flag, False)
    for text in ("message", "reason", "error_message"):
        if hasattr(response, text) and isinstance(getattr(response, text), str):
            setattr(response, text, one_line(reason))
    return response


def oversized(request: Any) -> str:
    """Why ``request`` has more entries (names, prefixes, parameters) than one request may
    (MAX_REQUEST_ENTRIES); empty if it has not."""
    for field in ("names", "prefixes", "parameters"):
        entries = getattr(request, field, None)
        if isinstance(entries, list) and len(entries) > MAX_REQUEST_ENTRIES:
            return f"{len(entries)} {field} in one request, more than {MAX_REQUEST_ENTRIES}"
    return ""


def guarded(
    callback: Callable[[Any, Any], Any], srv_type: Any, name: str, faults: CallbackFaults
) -> Callable[[Any, Any], Any]:
    """``callback`` that answers instead of raising (``refusal``), and reports what it raised;
    a request with more than MAX_REQUEST_ENTRIES entries is refused before it is handled."""

    def call(request: Any, response: Any) -> Any:
        too_many = oversized(request)
        if too_many:
            faults.refused(f"{name} size", f"{name}: {too_many}: refused")
            return refusal(srv_type, request, f"{too_many}: refused")
        try:
            answer = callback(request, response)
        except Exception as error:
            faults.record(f"service {name}", error)
            return refusal(srv_type, request, f"the request could not be handled: {error}")
        if not isinstance(answer, srv_type.Response):  # rclpy would raise in send_response
            faults.record(f"service {name}", TypeError(f"callback returned {answer!r}"))
            return refusal(srv_type, request, "the request could not be handled")
        return answer

    call.__wrapped__ = callback  # type: ignore[attr-defined]
    return call


def guard_services(node: Any, faults: CallbackFaults) -> int:
    """Make every service the node has answer instead of raising (module docstring); replace
    rclpy's two set services (``SetParameterServices``). Returns how many were guarded. Call
    once all services exist (the lifecycle ones are made with the node)."""
    setters = SetParameterServices(node, faults)
    count = 0
    for service in node.services:
        callback = service.callback
        if hasattr(callback, "__wrapped__"):  # guarded already
            continue
        if service.srv_type is SetParameters:
            callback = setters.set_parameters
        elif service.srv_type is SetParametersAtomically:
            callback = setters.set_parameters_atomically
        elif service.srv_type is ChangeState and hasattr(node, "_state_machine"):
            callback = ChangeStateGuard(node, callback, faults)
        service.callback = guarded(callback, service.srv_type, service.srv_name, faults)
        count += 1
    return count
