"""Malformed requests from another process never end the node (issue 18, item 2).

The node runs in its own process with a 30 Hz camera (this process, RELIABLE, every frame
delivered) for the whole module; the requests are built field by field (test/dds_attack.py), as
any process on the graph can send them. Before the fix, one ``set_parameters`` request whose
ParameterValue.type is outside 0-9 raised ValueError in rclpy's parameter service
(``Parameter.from_parameter_msg``) out of ``spin_once`` and the node exited; so did a /clock
message with a negative time while ``use_sim_time`` is on (rclpy's TimeSource).

Now every request is answered (a refusal with the reason where the service has a place for one),
each kind of error is logged once and counted in /diagnostics (``callback errors``), and at the
end every frame is accounted for: received = sent = processed + dropped + rejected + failed.
"""

from __future__ import annotations

import pytest
from builtin_interfaces.msg import Time
from dds_attack import (
    FrameStream,
    accounting,
    deep_qos,
    raw_parameter,
    reliable_input_overrides,
    settled_status,
)
from rcl_interfaces.msg import ParameterType
from rcl_interfaces.srv import (
    DescribeParameters,
    GetParameters,
    GetParameterTypes,
    ListParameters,
    SetParameters,
    SetParametersAtomically,
)
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_harness import EVENT_TIMEOUT_S, TINY_NODE_PARAMETERS, running_node, status_values
from rosgraph_msgs.msg import Clock

from ovss_ros.ros import parameters as node_parameters
from ovss_ros.ros.request_guard import MAX_REQUEST_ENTRIES

STATUS = "ovss: image"
CLASSES = ["person", "chair", "dog"]
RATE_HZ = 30.0
INVALID_TYPES = range(ParameterType.PARAMETER_STRING_ARRAY + 1, 256)  # 10 .. 255
VALID_TYPES = range(ParameterType.PARAMETER_STRING_ARRAY + 1)  # 0 .. 9
ODD_NAMES = ["", "x" * 5000, "classes\n[ERROR] forged", "..", "/", "椅子", "qos_overrides."]

pytestmark = pytest.mark.usefixtures("node_survives")


@pytest.fixture(scope="module")
def node(voc_rgb):
    parameters = TINY_NODE_PARAMETERS | {"classes": CLASSES}
    with running_node(parameters, reliable_input_overrides(), reliable_input=True) as (
        client,
        process,
    ):
        with FrameStream(voc_rgb[0][:48, :64], RATE_HZ) as stream:
            client.stream = stream
            client.spin_until(stream.matched)
            yield client, process


BURST = 500  # requests sent at once: half of what rclpy's parameter services keep waiting


class Services:
    """Typed clients of the node's parameter services, answered in bulk."""

    def __init__(self, client) -> None:
        self.client = client
        self.clients = {
            srv: client.node.create_client(srv, f"/ovss/{name}", qos_profile=deep_qos())
            for srv, name in (
                (SetParameters, "set_parameters"),
                (SetParametersAtomically, "set_parameters_atomically"),
                (DescribeParameters, "describe_parameters"),
                (GetParameters, "get_parameters"),
                (GetParameterTypes, "get_parameter_types"),
                (ListParameters, "list_parameters"),
            )
        }

    def call_all(self, srv: type, requests: list) -> list:
        """Send the requests BURST at a time; wait for every answer (each must come). rclpy's
        parameter services keep at most 1000 requests waiting (``qos_profile_parameters``):
        a larger burst loses requests in DDS before the node sees them."""
        service = self.clients[srv]
        self.client.spin_until(service.service_is_ready, message=f"service {service.srv_name}")
        answers = []
        for start in range(0, len(requests), BURST):
            futures = [service.call_async(request) for request in requests[start : start + BURST]]
            timeout = EVENT_TIMEOUT_S + 0.05 * len(futures)
            self.client.spin_until(
                lambda futures=futures: all(future.done() for future in futures),
                timeout,
                message=lambda futures=futures: (
                    f"{sum(not f.done() for f in futures)} of {len(futures)} "
                    f"requests to {service.srv_name} unanswered"
                ),
            )
            answers += [future.result() for future in futures]
        return answers


@pytest.fixture(scope="module")
def services(client):
    return Services(client)


def test_every_invalid_value_type_is_refused_on_both_set_services(client, services):
    """The issue's example and the rest of its kind: type bytes 10-255, each refused with the
    parameter's name and the reason; the classes in force stay."""
    plain = services.call_all(
        SetParameters,
        [SetParameters.Request(parameters=[raw_parameter("classes", t)]) for t in INVALID_TYPES],
    )
    atomic = services.call_all(
        SetParametersAtomically,
        [
            SetParametersAtomically.Request(parameters=[raw_parameter("classes", t)])
            for t in INVALID_TYPES
        ],
    )
    for type_id, answer in zip(INVALID_TYPES, plain, strict=True):
        (result,) = answer.results
        assert not result.successful
        assert f"parameter 'classes': value type {type_id} is not a ROS parameter type" in (
            result.reason
        )
    for type_id, answer in zip(INVALID_TYPES, atomic, strict=True):
        assert not answer.result.successful
        assert f"value type {type_id} is not a ROS parameter type" in answer.result.reason
    assert client.get_parameter("classes") == CLASSES


def test_a_malformed_parameter_costs_the_others_of_a_plain_request_nothing(client, services):
    """``set_parameters`` judges each parameter on its own; the atomic one refuses them all."""
    alpha = Parameter("overlay_alpha", value=0.25).to_parameter_msg()
    bad = raw_parameter("score_threshold", 42)
    (atomic,) = services.call_all(
        SetParametersAtomically, [SetParametersAtomically.Request(parameters=[alpha, bad])]
    )
    assert not atomic.result.successful and "value type 42" in atomic.result.reason
    assert client.get_parameter("overlay_alpha") == 0.5
    (plain,) = services.call_all(SetParameters, [SetParameters.Request(parameters=[alpha, bad])])
    good, refused = plain.results
    assert good.successful, good.reason
    assert not refused.successful and "'score_threshold': value type 42" in refused.reason
    assert client.get_parameter("overlay_alpha") == 0.25


def test_every_valid_type_on_every_parameter_is_answered(client, services):
    """Types 0-9 with their default field values, on every parameter the node has (its own and
    rclpy's, read-only ones too) and on undeclared names: one plain request per type (a
    result per parameter) and one atomic request per parameter and type."""
    (listed,) = services.call_all(ListParameters, [ListParameters.Request()])
    names = list(listed.result.names) + ODD_NAMES
    assert set(node_parameters.SPECS) <= set(names)
    plain = services.call_all(
        SetParameters,
        [
            SetParameters.Request(parameters=[raw_parameter(name, t) for name in names])
            for t in VALID_TYPES
        ],
    )
    for answer in plain:
        assert len(answer.results) == len(names)
    atomic = services.call_all(
        SetParametersAtomically,
        [
            SetParametersAtomically.Request(parameters=[raw_parameter(name, t)])
            for name in names
            for t in VALID_TYPES
        ],
    )
    assert len(atomic) == len(names) * len(VALID_TYPES)
    for name in ODD_NAMES:  # undeclared: refused with the name, never an exception
        index = names.index(name) * len(VALID_TYPES) + ParameterType.PARAMETER_STRING
        assert not atomic[index].result.successful
        assert "is not a parameter of this node" in atomic[index].result.reason
    # No type byte's default value is a valid vocabulary: the classes in force stay.
    assert client.get_parameter("classes") == CLASSES


def test_describe_get_and_list_answer_any_names(client, services):
    """Names no client would send, declared and not, mixed: each request answered (rclpy's
    empty answer for an undeclared name), the node alive."""
    mixes = [[name] for name in ODD_NAMES] + [["classes", *ODD_NAMES], ["classes"]]
    described = services.call_all(
        DescribeParameters, [DescribeParameters.Request(names=names) for names in mixes]
    )
    got = services.call_all(GetParameters, [GetParameters.Request(names=n) for n in mixes])
    types = services.call_all(
        GetParameterTypes, [GetParameterTypes.Request(names=n) for n in mixes]
    )
    assert described[-1].descriptors[0].name == "classes"
    assert list(got[-1].values[0].string_array_value)
    assert types[-1].types[0] == ParameterType.PARAMETER_STRING_ARRAY
    for answers in (described, got, types):
        assert len(answers) == len(mixes)
    listed = services.call_all(
        ListParameters,
        [
            ListParameters.Request(prefixes=prefixes, depth=depth)
            for prefixes in ([], ODD_NAMES, ["qos_overrides"], ["x" * 5000])
            for depth in (0, 1, 2, 2**64 - 1)
        ],
    )
    assert len(listed) == 16


def test_requests_with_too_many_entries_are_refused_before_they_are_handled(client, services):
    """A request of 20,000 names, prefixes or parameters (MAX_REQUEST_ENTRIES is 10,000) is
    answered at once with a refusal (set services: a reason per parameter) or an empty answer;
    a million names held the executor for 19 s before (a reviewer of issue 18). Requests at
    the limit are handled as before."""
    names = [f"no_such_parameter_{index}" for index in range(MAX_REQUEST_ENTRIES + 1)]
    (described,) = services.call_all(DescribeParameters, [DescribeParameters.Request(names=names)])
    (got,) = services.call_all(GetParameters, [GetParameters.Request(names=names)])
    (types,) = services.call_all(GetParameterTypes, [GetParameterTypes.Request(names=names)])
    (listed,) = services.call_all(ListParameters, [ListParameters.Request(prefixes=names)])
    assert not described.descriptors and not got.values and not types.types
    assert not listed.result.names
    parameters = [raw_parameter(name, ParameterType.PARAMETER_BOOL) for name in names]
    (plain,) = services.call_all(SetParameters, [SetParameters.Request(parameters=parameters)])
    (atomic,) = services.call_all(
        SetParametersAtomically, [SetParametersAtomically.Request(parameters=parameters)]
    )
    reason = f"{len(names)} parameters in one request, more than {MAX_REQUEST_ENTRIES}"
    assert len(plain.results) == len(names)
    assert all(not r.successful and reason in r.reason for r in plain.results[:3])
    assert not atomic.result.successful and reason in atomic.result.reason
    at_limit = ["classes"] * MAX_REQUEST_ENTRIES
    (got,) = services.call_all(GetParameters, [GetParameters.Request(names=at_limit)])
    assert len(got.values) == MAX_REQUEST_ENTRIES
    assert list(got.values[0].string_array_value) == CLASSES


def test_a_clock_message_with_a_negative_time_is_survived(client, node):
    """With use_sim_time, rclpy's TimeSource raised ValueError for a /clock before 1970."""
    _, process = node
    assert client.set_parameters([Parameter("use_sim_time", value=True)])[0].successful
    try:
        clock = client.node.create_publisher(
            Clock, "/clock", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        )
        client.spin_until(lambda: clock.get_subscription_count() > 0)
        # The count is the node's since start-up (earlier tests here add to it): wait for more.
        before = client.counter("callback errors", STATUS)
        for _ in range(3):
            clock.publish(Clock(clock=Time(sec=-5, nanosec=0)))
        client.wait_for_status(STATUS, lambda values: int(values["callback errors"]) > before)
        client.node.destroy_publisher(clock)
    finally:
        assert client.set_parameters([Parameter("use_sim_time", value=False)])[0].successful
    process.wait_for_output("Seconds value must not be negative", EVENT_TIMEOUT_S)


def test_callback_errors_are_counted_and_logged_once_per_kind(client, node):
    _, process = node
    status = client.wait_for_status(STATUS, lambda values: int(values["callback errors"]) > 0)
    errors = int(status_values(status)["callback errors"])
    assert errors >= len(INVALID_TYPES) * 2  # both set services, every invalid type
    logged = [line for line in process.output().splitlines() if "is not a ROS parameter" in line]
    assert len(logged) == 2, logged  # once per service
    assert "Traceback" not in process.output()


def test_every_frame_is_accounted_for(client):
    """Last: the camera stops, the node settles, the sums hold (frames flowed throughout)."""
    stream = client.stream
    stream.stop()
    sent = stream.sent
    values = settled_status(client, STATUS, sent)
    received, outcomes = accounting(values)
    assert received == sent == outcomes, values
    assert int(values["frames processed"]) > 0
