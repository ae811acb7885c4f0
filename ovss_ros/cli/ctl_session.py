"""The ROS side of ``ovss-ctl``: one rclpy client node in a context of its own, with waits that
end on time with one clear reason.

A ``Session`` calls the ovss node's services (parameters, ``~/enable``, the lifecycle services)
and reads its topics. Every wait has a limit; running out of it raises ``NoAnswer`` with one line
that says what did not answer. A service response that the middleware drops in the first seconds
after discovery (Fast DDS may: docs/ros_interface.md, "Service calls from other processes") is
covered by sending a repeatable request again (``call``); a lifecycle transition is sent again
only after ``~/get_state`` shows it did not happen (``transition``), as the tests' client does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

ATTEMPT_S = 3.0  # a request without an answer after this long is sent again (repeatable ones)
GRACE_S = 2.0  # the target's other services seen this long without the one asked for: it has none


class NoAnswer(Exception):
    """A wait ran out: the message is the one line the tool prints."""


class Session:
    """An rclpy node of its own (own context: usable beside another rclpy user in the process)
    that talks to the ovss node ``target`` (its full name, e.g. ``/ovss``)."""

    def __init__(self, target: str, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node("ovss_ctl", context=self.context, start_parameter_services=False)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def not_running(self) -> NoAnswer:
        return NoAnswer(
            f"no node {self.target} answered within {self.timeout:g} s: is it running, in this "
            "ROS_DOMAIN_ID?"
        )

    def spin_until(self, condition: Callable[[], Any], seconds: float) -> Any:
        """Spin until ``condition()`` is truthy (return it) or ``seconds`` pass (return None)."""
        deadline = time.monotonic() + seconds
        while True:
            value = condition()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.executor.spin_once(timeout_sec=min(0.05, remaining))

    def client(self, service_type: type, relative: str) -> Any:
        """A client of the target's service ``relative`` (``get_parameters``), once discovered;
        raises NoAnswer when it does not show within the timeout."""
        client = self.node.create_client(service_type, f"{self.target}/{relative}")
        lacking_since: list[float] = []

        def ready_or_lacking() -> bool:
            """Ready, or the target's services are in the graph without this one for
            GRACE_S (a node announces its services together): no wait for the timeout."""
            if client.service_is_ready():
                return True
            if self._services() and client.srv_name not in self._services():
                lacking_since.append(time.monotonic())
                return lacking_since[-1] - lacking_since[0] >= GRACE_S
            lacking_since.clear()
            return False

        if not self.spin_until(ready_or_lacking, self.timeout) or not client.service_is_ready():
            if self.node_exists():
                hint = " (only ovss_lifecycle_node has it)" if "state" in relative else ""
                raise NoAnswer(f"{self.target} has no service {client.srv_name}{hint}")
            raise self.not_running()
        return client

    def _services(self) -> set[str]:
        """The services the target offers, as this process's graph shows them."""
        return self._by_target(self.node.get_service_names_and_types_by_node)

    def _published(self) -> set[str]:
        """The topics the target publishes, as this process's graph shows them."""
        return self._by_target(self.node.get_publisher_names_and_types_by_node)

    def _by_target(self, lookup: Callable[[str, str], list]) -> set[str]:
        namespace, _, name = self.target.rpartition("/")
        try:
            found = lookup(name, namespace or "/")
        except Exception:  # rclpy raises NodeNameNonExistentError while it is not discovered
            return set()
        return {entity for entity, _types in found}

    def node_exists(self) -> bool:
        """The target is in this process's view of the ROS graph."""
        names = self.node.get_node_names_and_namespaces()
        full = {f"{namespace.rstrip('/')}/{name}" for name, namespace in names}
        return self.target in full

    def call(self, service_type: type, relative: str, request: Any, repeat: bool = True) -> Any:
        """The response to ``request`` on the target's service ``relative``; a repeatable request
        is sent again every ATTEMPT_S without an answer. Raises NoAnswer."""
        client = self.client(service_type, relative)
        deadline = time.monotonic() + self.timeout
        futures: list[Any] = []
        try:
            while True:
                if repeat or not futures:
                    futures.append(client.call_async(request))
                remaining = deadline - time.monotonic()
                done = self.spin_until(
                    lambda: next((f for f in futures if f.done()), None),
                    min(ATTEMPT_S, max(remaining, 0.0)),
                )
                if done is not None:
                    return done.result()
                if time.monotonic() >= deadline:
                    raise NoAnswer(
                        f"{self.target}/{relative} did not answer within {self.timeout:g} s"
                    )
        finally:
            for future in futures:
                if not future.done():
                    client.remove_pending_request(future)

    def lifecycle_state(self) -> str:
        """The target's lifecycle state label (``unconfigured``, ``inactive``, ...)."""
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, "get_state", GetState.Request()).current_state.label

    def transition(self, transition_id: int, goal: str, seconds: float) -> tuple[bool, str]:
        """Ask for a lifecycle transition; (success, state afterwards). When an answer is lost,
        ``~/get_state`` decides: in ``goal`` it happened; in the start state it is sent again."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        start = self.lifecycle_state()
        client = self.client(ChangeState, "change_state")
        request = ChangeState.Request(transition=Transition(id=transition_id))
        deadline = time.monotonic() + seconds
        while True:
            future = client.call_async(request)
            # One executor thread in the node: get_state answers once a transition is over.
            if self.spin_until(future.done, min(ATTEMPT_S, max(deadline - time.monotonic(), 0))):
                success = future.result().success
                return success, self.lifecycle_state()
            client.remove_pending_request(future)
            state = self.lifecycle_state()
            if state == goal:
                return True, state
            if state != start:
                return False, state
            if time.monotonic() >= deadline:
                raise NoAnswer(f"{self.target}/change_state did not answer within {seconds:g} s")

    def wait_for_messages(
        self, subscriptions: dict[str, tuple[type, Any]], done: Callable[[dict], bool]
    ) -> dict[str, list[Any]]:
        """Subscribe to each topic (name -> (type, QoS)) and collect messages until
        ``done(received)``; raises NoAnswer naming what is missing after the timeout."""
        received: dict[str, list[Any]] = {topic: [] for topic in subscriptions}
        for topic, (message_type, qos) in subscriptions.items():
            self.node.create_subscription(message_type, topic, received[topic].append, qos)
        lacking_since: list[float] = []

        def done_or_lacking() -> bool:
            """Done, or the target publishes (other topics) without any of these for GRACE_S:
            a camera it does not have, said without waiting for the timeout."""
            if done(received):
                return True
            if self._published() and not any(
                self.node.count_publishers(topic) for topic in subscriptions
            ):
                lacking_since.append(time.monotonic())
                return lacking_since[-1] - lacking_since[0] >= GRACE_S
            lacking_since.clear()
            return False

        if self.spin_until(done_or_lacking, self.timeout) and done(received):
            return received
        silent = [topic for topic, messages in received.items() if not messages]
        published = [topic for topic in silent if self.node.count_publishers(topic) > 0]
        if silent and not published:
            if self.node_exists():
                raise NoAnswer(
                    f"{self.target} publishes no {', '.join(silent)}: is the camera name one of "
                    "its cameras parameter?"
                )
            raise self.not_running()
        raise NoAnswer(
            f"no message on {', '.join(silent) or 'the topics together'} within "
            f"{self.timeout:g} s: is a camera publishing to the node's input, and is it enabled "
            "and active?"
        )
