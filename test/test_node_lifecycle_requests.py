"""Malformed requests to the managed node's services never end it (issue 18, item 2).

``ovss_lifecycle_node`` in its own process (the console script, as ``ros2 run`` starts it):
``~/change_state`` with every transition id that is not valid from its state and with labels no
transition has, the other lifecycle services, and set_parameters with a type byte outside
0-9, each sent raw from this process, all at once. Every request is answered (a refused
transition with ``success`` false), the state does not change; then the node configures and
activates as usual and segments a frame, and stops cleanly.
"""

from __future__ import annotations

import pytest
import rclpy
from dds_attack import deep_qos, raw_parameter
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import (
    ChangeState,
    GetAvailableStates,
    GetAvailableTransitions,
    GetState,
)
from rcl_interfaces.srv import SetParameters, SetParametersAtomically
from ros_harness import (
    EVENT_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    Lifecycle,
    NodeProcess,
    OvssClient,
    isolate_dds,
    make_image,
    next_header,
    startup_timeout,
    status_values,
)

EXECUTABLE = "ovss_lifecycle_node"
# From unconfigured, only configure (1) and shutdown (5) are transitions.
REFUSED_IDS = [id_ for id_ in range(256) if id_ not in (1, 5)]
CHUNK = 8
ODD_LABELS = ["", "x" * 5000, "configure\n", "Configure", "椅子", "unconfigured", "finalized"]


@pytest.fixture(scope="module")
def node():
    isolate_dds()
    parameters = TINY_NODE_PARAMETERS | {"classes": ["cat", "dog"]}
    process = NodeProcess(parameters, executable=EXECUTABLE)
    rclpy.init()
    client = OvssClient()
    try:
        yield client, process
    finally:
        client.destroy()
        rclpy.shutdown()
        code = process.stop()
    assert code == 0, process.output()
    assert "Traceback" not in process.output(), process.output()
    process.log_path.unlink(missing_ok=True)


def call_all(client: OvssClient, srv: type, name: str, requests: list) -> list:
    """Answers to ``requests``, sent CHUNK at a time: rcl's lifecycle services keep the default
    service history of 10 requests (more at once would be dropped by DDS, not by the node)."""
    service = client.node.create_client(srv, f"/ovss/{name}", qos_profile=deep_qos())
    client.spin_until(service.service_is_ready, startup_timeout(), message=f"service {name}")
    answers = []
    for start in range(0, len(requests), CHUNK):
        futures = [service.call_async(request) for request in requests[start : start + CHUNK]]
        client.spin_until(
            lambda futures=futures: all(future.done() for future in futures),
            message=lambda futures=futures: (
                f"{sum(not f.done() for f in futures)} requests to {name} unanswered"
            ),
        )
        answers += [future.result() for future in futures]
    return answers


def test_lifecycle_and_parameter_services_answer_malformed_requests(node, voc_rgb):
    client, process = node
    lifecycle = Lifecycle(client, "/ovss")
    assert lifecycle.state(timeout=startup_timeout()) == "unconfigured", process.output()
    requests = [ChangeState.Request(transition=Transition(id=id_)) for id_ in REFUSED_IDS]
    requests += [ChangeState.Request(transition=Transition(label=label)) for label in ODD_LABELS]
    answers = call_all(client, ChangeState, "change_state", requests)
    assert not any(answer.success for answer in answers)
    for srv, name in (
        (GetState, "get_state"),
        (GetAvailableStates, "get_available_states"),
        (GetAvailableTransitions, "get_available_transitions"),
        (GetAvailableTransitions, "get_transition_graph"),
    ):
        (answer,) = call_all(client, srv, name, [srv.Request()])
    plain = call_all(
        client,
        SetParameters,
        "set_parameters",
        [SetParameters.Request(parameters=[raw_parameter("classes", t)]) for t in range(10, 256)],
    )
    atomic = call_all(
        client,
        SetParametersAtomically,
        "set_parameters_atomically",
        [SetParametersAtomically.Request(parameters=[raw_parameter("method", 99)])],
    )
    assert all(not answer.results[0].successful for answer in plain)
    assert "value type 99 is not a ROS parameter type" in atomic[0].result.reason
    assert process.returncode is None, process.output()
    assert lifecycle.state() == "unconfigured"
    # One line for all the refused transitions, not one (ERROR) per request.
    refused = [line for line in process.output().splitlines() if "change_state" in line]
    assert len(refused) == 1, refused
    assert "Unable to start transition" not in process.output()

    # And it still does its job.
    lifecycle.activate()
    client.spin_until(client.inputs_matched, 2 * EVENT_TIMEOUT_S)
    frame = make_image(voc_rgb[0][:48, :64].copy(), "rgb8", next_header(client.node))
    client.wait_for_output(frame, ("labels",))
    # A fresh malformed request: the diagnostics window (5 s) may have passed the earlier ones
    # on a loaded machine; this one is reported within it.
    seen = len(client.statuses("ovss: image"))
    call_all(
        client,
        SetParametersAtomically,
        "set_parameters_atomically",
        [SetParametersAtomically.Request(parameters=[raw_parameter("method", 99)])],
    )
    text = "request or callback errors in the last"
    status = client.spin_until(
        lambda: next(
            (m for m in client.statuses("ovss: image")[seen:] if text in m.message), None
        ),
        EVENT_TIMEOUT_S,
        message="a status reporting the malformed requests",
    )
    assert int(status_values(status)["callback errors"]) > 0
