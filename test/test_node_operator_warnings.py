"""Mistakes reported, not ignored (issue 11, item 4), with the node in its own process over DDS.

- A parameter given at start-up that the node does not declare (``-p clases:=...``, a typo in a
  params file, a QoS override for a topic the node does not have) is a warning naming the
  closest real parameter; the node starts anyway, and correct names give no warning.
- Another node with the node's fully qualified name: a warning in the log and in diagnostics,
  gone from diagnostics when that node goes.
- ``ovss_node --help`` / ``ovss_lifecycle_node --help``: usage with every parameter, exit 0,
  no ROS started.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import rclpy
import yaml
from lifecycle_msgs.msg import Transition
from rclpy.node import Node
from rclpy.parameter import Parameter
from ros_harness import (
    EVENT_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    Lifecycle,
    NodeProcess,
    OvssClient,
    child_environment,
    console_script,
    running_node,
)

from ovss_ros.ros import parameters as node_parameters
from ovss_ros.ros.entry import wants_help
from ovss_ros.ros.undeclared import undeclared_overrides

STATUS = "ovss: image"
IGNORED = "is not a parameter of this node: "
# Given name -> what the warning must suggest.
MISTAKES = {
    "clases": "did you mean classes?",
    "overlay_alpa": "did you mean overlay_alpha?",
    "scor_threshold": "did you mean score_threshold?",  # from the params file
    "qos_overrides./imag.subscription.reliability": (
        "did you mean qos_overrides./image.subscription.reliability?"
    ),
    "zzz_frobnicate": "no parameter of that name exists",
}


def ignored_lines(output: str) -> dict[str, list[str]]:
    """Parameter name -> the warning lines about it."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        if IGNORED in line:
            name = line.split("parameter ", 1)[1].split(" ", 1)[0]
            found.setdefault(name, []).append(line)
    return found


def test_undeclared_overrides_pairs_each_unknown_name_with_the_closest():
    declared = ["classes", "overlay_alpha", "use_sim_time"]
    assert undeclared_overrides(["classes", "clases", "use_sim_tim", "xyz"], declared) == [
        ("clases", "classes"),
        ("use_sim_tim", "use_sim_time"),
        ("xyz", None),
    ]
    assert undeclared_overrides(["classes"], declared) == []


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    params_file = tmp_path_factory.mktemp("params") / "typo.yaml"
    params_file.write_text(
        yaml.safe_dump({"/**": {"ros__parameters": {"scor_threshold": 0.2, "short_side": 64}}})
    )
    extra = ["--params-file", str(params_file)]
    for name, value in (
        ("clases", "[cat, dog]"),
        ("overlay_alpa", "0.3"),
        ("zzz_frobnicate", "1"),
        ("qos_overrides./imag.subscription.reliability", "reliable"),
        # Real names: rclpy's own, a QoS override of an output, of the input: no warning.
        ("use_sim_time", "false"),
        ("qos_overrides./ovss/labels.publisher.depth", "3"),
        ("qos_overrides./image.subscription.depth", "1"),
    ):
        extra += ["-p", f"{name}:={value}"]
    parameters = TINY_NODE_PARAMETERS | {"classes": ["cat", "dog"]}
    with running_node(parameters, extra_ros_args=extra) as (client, process):
        yield client, process


def test_each_unknown_parameter_is_reported_once_with_the_closest_name(node):
    client, process = node
    # The QoS names are checked once the input is subscribed: running_node waited for that.
    process.wait_for_output("qos_overrides./imag.", timeout=EVENT_TIMEOUT_S)
    found = ignored_lines(process.output())
    assert set(found) == set(MISTAKES), process.output()
    for name, hint in MISTAKES.items():
        (line,) = found[name]  # once
        assert "[WARN]" in line and line.endswith(f"{hint} (the value is ignored)"), line
    # The node runs with the values it does know, the typo ignored.
    assert client.get_parameter("overlay_alpha") == 0.5
    assert client.get_parameter("short_side") == 64  # the params file's real name applied
    assert client.get_parameter("score_threshold") == 0.0


def test_an_unknown_name_at_runtime_is_refused_naming_it_and_the_closest(node):
    # rclpy's own refusal names nothing: "Invalid access to undeclared parameter(s): []".
    client, _ = node
    (result,) = client.set_parameters([Parameter("clases", value=["cat"])])
    assert not result.successful
    assert result.reason == "clases is not a parameter of this node: did you mean classes?"
    results = client.set_parameters([Parameter("zzz", value=1)])
    assert (
        results[0].reason
        == "zzz is not a parameter of this node: no parameter of that name exists"
    )
    assert client.get_parameter("classes") == ["cat", "dog"]


def test_an_atomic_request_with_one_unknown_name_changes_nothing(node):
    from rcl_interfaces.srv import SetParametersAtomically
    from ros_harness import call_service

    client, _ = node
    service = client.node.create_client(SetParametersAtomically, "/ovss/set_parameters_atomically")
    request = SetParametersAtomically.Request(
        parameters=[
            Parameter("overlay_alpha", value=0.9).to_parameter_msg(),
            Parameter("overlay_alpa", value=0.9).to_parameter_msg(),
        ]
    )
    result = call_service(client.node, service, request).result
    assert not result.successful
    assert result.reason == (
        "overlay_alpa is not a parameter of this node: did you mean overlay_alpha?"
    )
    assert client.get_parameter("overlay_alpha") == 0.5


def test_an_old_flat_name_at_runtime_is_refused_with_its_new_name(node):
    """Issue 19: set_parameters and set_parameters_atomically naming a parameter of an earlier
    release are refused with the new name (over DDS, the node in its own process); nothing
    changes, the new name works."""
    from rcl_interfaces.srv import SetParametersAtomically
    from ros_harness import call_service

    client, _ = node
    (result,) = client.set_parameters([Parameter("crop", value=32)])
    assert not result.successful and result.reason == "crop was renamed dense.crop"
    results = client.set_parameters([Parameter("pnp_layer", value=9)])
    assert results[0].reason == "pnp_layer was renamed pnp.layer"
    service = client.node.create_client(SetParametersAtomically, "/ovss/set_parameters_atomically")
    request = SetParametersAtomically.Request(
        parameters=[
            Parameter("overlay_alpha", value=0.9).to_parameter_msg(),
            Parameter("sd_size", value=256).to_parameter_msg(),
        ]
    )
    result = call_service(client.node, service, request).result
    assert not result.successful and result.reason == "sd_size was renamed dslo.sd.size"
    assert client.get_parameter("overlay_alpha") == 0.5
    assert client.get_parameter("dense.crop") == 0 and client.get_parameter("pnp.layer") == 8
    (result,) = client.set_parameters([Parameter("pnp.layer", value=9)])
    assert result.successful, result.reason
    assert client.get_parameter("pnp.layer") == 9
    assert client.set_parameters([Parameter("pnp.layer", value=8)])[0].successful


def wait_for_message(client: OvssClient, predicate) -> object:
    """The first status received from now on whose message satisfies ``predicate``."""
    seen = len(client.statuses(STATUS))
    return client.spin_until(
        lambda: next((s for s in client.statuses(STATUS)[seen:] if predicate(s.message)), None),
        message=lambda: f"status; last: {client.statuses(STATUS)[-1:]}",
    )


def test_a_node_with_the_same_name_is_reported_in_log_and_diagnostics(node):
    client, process = node
    status = wait_for_message(client, lambda message: True)
    assert "another node" not in status.message and "another node" not in process.output()
    twin = Node("ovss")  # the same fully qualified name, /ovss, in another process
    try:
        status = wait_for_message(client, lambda message: "another node named /ovss" in message)
        assert status.level == bytes([1])  # WARN
        assert "-r __node:=" in status.message  # the fix
        process.wait_for_output("another node named /ovss", timeout=EVENT_TIMEOUT_S)
        (line,) = [line for line in process.output().splitlines() if "another node" in line]
        assert "[WARN]" in line
    finally:
        twin.destroy_node()
    wait_for_message(client, lambda message: "another node" not in message)
    # Logged once, while the twin was there, not every second.
    assert process.output().count("another node named /ovss") == 1


def test_lifecycle_node_reports_unknown_names_at_construction_and_qos_ones_on_activate():
    extra = [
        "-r",
        "__node:=ovss_managed",
        "-p",
        "clases:=[cat]",
        "-p",
        "qos_overrides./imag.subscription.depth:=1",
    ]
    with NodeProcess(
        TINY_NODE_PARAMETERS, extra_ros_args=extra, executable="ovss_lifecycle_node"
    ) as process:
        process.wait_for_output("clases", timeout=STARTUP_TIMEOUT_S)
        own_context = not rclpy.ok()  # alone (-k): running_node's context is not there
        if own_context:
            rclpy.init()
        client = OvssClient(node_namespace="/ovss_managed", name="lifecycle_typo_client")
        try:
            lifecycle = Lifecycle(client, "/ovss_managed")
            assert lifecycle.state() == "unconfigured"
            # Unconfigured: no subscription yet, so no QoS name can be judged.
            assert "qos_overrides./imag." not in process.output()
            assert lifecycle.transition(Transition.TRANSITION_CONFIGURE)
            assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
            process.wait_for_output("qos_overrides./imag.", timeout=EVENT_TIMEOUT_S)
            found = ignored_lines(process.output())
            assert "did you mean classes?" in found["clases"][0]
            assert (
                "did you mean qos_overrides./image.subscription.depth?"
                in found["qos_overrides./imag.subscription.depth"][0]
            )
            assert set(found) == {"clases", "qos_overrides./imag.subscription.depth"}
            assert all(len(lines) == 1 for lines in found.values())
        finally:
            client.destroy()
            if own_context:
                rclpy.shutdown()


# --help


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    module, function = console_script(name)
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
    )


@pytest.mark.parametrize(
    ("script", "flag"), [("ovss_node", "--help"), ("ovss_lifecycle_node", "-h")]
)
def test_help_prints_every_parameter_and_exits_without_starting_ros(script, flag):
    # Were ROS started, this checkpoint would end start-up with "cannot start", status 1.
    result = run_script(script, flag, "--ros-args", "-p", "pretrained:=/no/such/weights.bin")
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert text.startswith(f"usage: {script} ")
    assert "cannot start" not in text + result.stderr
    assert "fastdds_large_data.xml" in text
    lines = text.splitlines()
    for spec in node_parameters.PARAMETERS:
        (index,) = [i for i, line in enumerate(lines) if line.startswith(f"  {spec.name} (")]
        header = lines[index]
        assert ("start-up (read-only)" if spec.read_only else "runtime") in header
        assert f"default {spec.default!r}" in header
        if spec.minimum is not None:
            assert f"range {spec.range_text()}" in header
        # The description follows, wrapped (indented deeper, up to the next parameter): its
        # words in order.
        body = []
        for line in lines[index + 1 :]:
            if not line.startswith("    "):
                break
            body.append(line.strip())
        following = " ".join(body)
        assert " ".join(spec.description.split()) in following, spec.name
        if spec.constraints:
            assert " ".join(f"values: {spec.constraints}".split()) in following
    # The names of earlier releases, with their new ones.
    assert "crop -> dense.crop" in text and "sd_size -> dslo.sd.size" in " ".join(lines)


@pytest.mark.parametrize(
    ("module", "program"),
    [("ovss_ros.ros.node", "ovss_node"), ("ovss_ros.ros.lifecycle_node", "ovss_lifecycle_node")],
)
def test_help_of_the_module_run_with_python_m_is_the_scripts(module, program):
    """``python -m ovss_ros.ros.node --help`` printed nothing and started the node."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help", "--ros-args", "-p", "pretrained:=/no/such.bin"],
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"usage: {program} ") and "dense.crop (" in result.stdout
    assert "cannot start" not in result.stdout + result.stderr


def test_help_is_only_ours_before_ros_args():
    assert wants_help(["--help"]) and wants_help(["-h", "--ros-args", "-p", "a:=1"])
    assert not wants_help([])
    assert not wants_help(["--ros-args", "-p", "a:=1", "--help"])  # ROS's own arguments
    assert not wants_help(["--ros-args", "-p", "classes:=[-h]"])


def test_help_into_a_pipe_closed_early_ends_quietly():
    """`ovss_node --help | head -2`: the reader closes the pipe after two lines; the help used to
    end with a BrokenPipeError traceback."""
    module, function = console_script("ovss_node")
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "--help"],
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.readline().startswith(b"usage: ")
    process.stdout.close()  # as head does, with the parameter list still to come
    _, errors = process.communicate(timeout=STARTUP_TIMEOUT_S)
    assert process.returncode == 0, errors.decode()
    assert b"Traceback" not in errors and b"BrokenPipe" not in errors, errors.decode()
