"""ovss-ctl against real nodes over real DDS: the plain node (/ovss) and the managed node
(/ovss_managed), each in its own process, started together once for the module.

The tool runs in this process through ``main(argv)`` (its own rclpy context beside the test's
client) or, where the test must feed frames while it waits, as its console script in a child
process with the same ROS domain.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
from conftest import VOC_DIR, voc_image_paths
from rcl_interfaces.msg import ParameterType
from ros_harness import (
    EVENT_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    NodeProcess,
    OvssClient,
    child_environment,
    isolate_dds,
    make_image,
    next_header,
    startup_timeout,
)

from ovss_ros.cli.ctl import main
from ovss_ros.cli.ctl_values import typed_value

CLASSES = ["cat", "dog", "person"]
DATA_VOC = VOC_DIR / "JPEGImages"
WAIT = str(EVENT_TIMEOUT_S)  # --timeout for a node that runs


@pytest.fixture(scope="module")
def node():
    """The plain node and the managed node (started together), and the test's client."""
    isolate_dds()
    plain = NodeProcess(TINY_NODE_PARAMETERS | {"classes": CLASSES})
    managed = NodeProcess(
        TINY_NODE_PARAMETERS,
        extra_ros_args=["-r", "__node:=ovss_managed", "-r", "image:=managed/image"],
        executable="ovss_lifecycle_node",
    )
    rclpy.init()
    client = OvssClient()
    try:
        client.spin_until(
            lambda: plain.returncode is not None or client.ready(),
            startup_timeout(2),
            message=lambda: f"node start-up:\n{plain.output()}\nthe client:\n{client.describe()}",
        )
        assert plain.returncode is None, plain.output()
        yield client, plain, managed
    finally:
        client.destroy()
        rclpy.shutdown()
        codes = plain.stop(), managed.stop()
    assert codes == (0, 0), f"{codes}\n{plain.output()}\n{managed.output()}"


@pytest.fixture()
def client(node):
    node[0].clear()
    yield node[0]
    assert node[1].returncode is None, f"node died:\n{node[1].output()}"


def ctl(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ovss-ctl in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status = main([*argv])
    except SystemExit as error:
        status = error.code
    out, err = capsys.readouterr()
    return status, out, err


def test_set_and_get_round_trip_with_the_nodes_types(client, capsys):
    status, out, err = ctl(
        capsys, "set", "dense.crop", "32", "score_threshold", "1", "--timeout", WAIT
    )
    assert (status, err) == (0, ""), err
    assert out.splitlines() == ["dense.crop: 32", "score_threshold: 1.0"]
    # Typed by the node's descriptors: an integer, and a double for "1".
    assert client.get_parameter("dense.crop") == 32
    threshold = client.get_parameter("score_threshold")
    assert isinstance(threshold, float) and threshold == 1.0
    status, out, err = ctl(capsys, "get", "dense.crop", "score_threshold", "method")
    assert status == 0, err
    assert out.splitlines() == ["dense.crop: 32", "score_threshold: 1.0", 'method: "naclip"']
    status, out, _ = ctl(capsys, "get", "--all")
    lines = out.splitlines()
    assert status == 0 and lines == sorted(lines)
    assert {"dense.crop: 32", "classes: " + '["cat", "dog", "person"]'} <= set(lines)
    assert any(line.startswith("dslo.sd.size: ") for line in lines)
    assert ctl(capsys, "set", "dense.crop", "0", "score_threshold", "0")[0] == 0
    assert client.get_parameter("dense.crop") == 0


def test_a_multi_set_is_refused_whole_with_the_nodes_reason(client, capsys):
    status, out, err = ctl(capsys, "set", "score_threshold", "0.3", "dense.crop", "5000")
    assert status == 1 and out == ""
    assert len(err.splitlines()) == 1 and "dense.crop" in err and "refused" in err, err
    assert client.get_parameter("score_threshold") == 0.0  # nothing applied


def test_an_old_name_is_refused_with_its_new_name(client, capsys):
    status, _, err = ctl(capsys, "set", "crop", "224")
    assert status == 1 and "crop was renamed dense.crop" in err, err
    status, _, err = ctl(capsys, "get", "clases")
    assert status == 1 and "no parameter 'clases'" in err and "classes" in err, err
    status, _, err = ctl(capsys, "get", "crop")
    assert (status, err) == (
        1,
        "ovss-ctl: /ovss has no parameter 'crop' (crop was renamed dense.crop)\n",
    )


def test_a_value_of_the_wrong_type_is_bad_input(client, capsys):
    status, _, err = ctl(capsys, "set", "dense.crop", "abc")
    assert status == 2 and "dense.crop takes an integer" in err and len(err.splitlines()) == 1
    status, _, err = ctl(capsys, "set", "publish_masks", "maybe")
    assert status == 2 and "boolean" in err


def test_classes_set_and_read_back(client, capsys):
    status, out, err = ctl(capsys, "classes", "cup", "door handle; handle")
    assert status == 0, err
    assert client.get_parameter("classes") == ["cup", "door handle; handle"]
    info = client.spin_until(
        lambda: [m for m in client.messages[client.topic("label_info")] if len(m.class_map) == 2]
    )
    assert [entry.class_name for entry in info[-1].class_map] == ["cup", "door handle"]
    status, out, _ = ctl(capsys, "classes")
    assert status == 0 and out.splitlines() == ["0: cup", "1: door handle; handle"]
    status, _, err = ctl(capsys, "classes", "cup", "cup")
    assert status == 1 and "duplicate class 'cup'" in err
    assert ctl(capsys, "classes", *CLASSES)[0] == 0


def test_method_switches_and_an_unknown_one_is_refused(client, capsys):
    assert ctl(capsys, "method", "sclip")[0] == 0
    assert client.get_parameter("method") == "sclip"
    status, _, err = ctl(capsys, "method", "nonsense")
    assert status == 1 and "method" in err
    assert ctl(capsys, "method", "naclip")[0] == 0


def test_disable_pauses_and_enable_resumes(client, capsys, voc_rgb):
    status, out, _ = ctl(capsys, "disable", "--timeout", WAIT)
    assert status == 0 and "paused" in out
    message = make_image(voc_rgb[0], "rgb8", next_header(client.node))
    client.publish_until_counted(message, "frames dropped (paused)")
    assert client.find("labels", message.header) is None
    status, out, _ = ctl(capsys, "diagnostics", "--once", "--timeout", WAIT)
    assert status == 0 and out.startswith("ovss: image: ")
    assert "  enabled: false" in out.splitlines(), out
    status, out, _ = ctl(capsys, "enable")
    assert status == 0 and "enabled" in out
    message = make_image(voc_rgb[0], "rgb8", next_header(client.node))
    client.wait_for_output(message, ("labels",))


def test_save_frame_writes_the_next_overlay_and_labels(client, tmp_path, voc_rgb):
    rgb = voc_rgb[0]
    out_dir = tmp_path / "frames"
    tool = tool_process("save-frame", str(out_dir), "--timeout", WAIT)
    deadline = time.monotonic() + EVENT_TIMEOUT_S * 2
    while tool.poll() is None and time.monotonic() < deadline:
        client.image_pub.publish(make_image(rgb, "rgb8", next_header(client.node)))
        client.spin_for(0.5)
    out, err = tool.communicate(timeout=EVENT_TIMEOUT_S)
    assert tool.returncode == 0, err
    overlay = cv2.imread(str(out_dir / "overlay.png"), cv2.IMREAD_UNCHANGED)
    labels = cv2.imread(str(out_dir / "labels.png"), cv2.IMREAD_UNCHANGED)
    assert out.split() == [str(out_dir / "overlay.png"), str(out_dir / "labels.png")]
    assert overlay.shape == rgb.shape and overlay.dtype == np.uint8
    assert labels.shape == rgb.shape[:2] and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 255}


@pytest.fixture()
def photos(tmp_path):
    """A folder with two VOC photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in voc_image_paths()[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def test_play_once_publishes_each_image_at_the_rate(client, capsys, photos):
    names = sorted(path.name for path in photos.iterdir())
    status, out, err = ctl(capsys, "play", str(photos), "--rate", "20", "--timeout", WAIT)
    assert (status, err) == (0, ""), err
    assert out.splitlines() == [
        f"1: {names[0]} -> /image",
        f"2: {names[1]} -> /image",
        "published 2 frames",
    ]


def test_play_loops_frames_the_node_segments_until_ctrl_c(client, photos):
    labels = client.topic("labels")
    tool = tool_process("play", str(photos), "--loop", "--rate", "5", "--frame-id", "played")
    client.spin_until(
        lambda: (
            tool.poll() is not None
            or any(m.header.frame_id == "played" for m in client.messages[labels])
        ),
        EVENT_TIMEOUT_S,
        message="a labels frame of a played image",
    )
    assert tool.poll() is None, tool.communicate()
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=EVENT_TIMEOUT_S)
    assert tool.returncode == 0 and "Traceback" not in err, err  # Ctrl-C ends --loop
    assert out.splitlines()[-1] == f"published {len(out.splitlines()) - 1} frames", out
    played = [m for m in client.messages[labels] if m.header.frame_id == "played"]
    sizes = {cv2.imread(str(path)).shape[:2] for path in photos.iterdir()}
    assert {(m.height, m.width) for m in played} <= sizes  # as the files are (under 1280 px)
    assert out.startswith("1: ")


def test_ctrl_c_while_waiting_for_a_frame_is_130(client):
    overlay = client.topic("overlay")
    tool = tool_process("save-frame", "never_written", "--timeout", "300")
    client.spin_until(  # its subscription is up: it waits for a frame
        lambda: tool.poll() is not None or client.node.count_subscribers(overlay) > 1,
        EVENT_TIMEOUT_S,
        message="ovss-ctl's subscription",
    )
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=EVENT_TIMEOUT_S)
    assert (tool.returncode, out, err) == (130, "", "ovss-ctl: interrupted\n")


def test_save_frame_of_a_camera_the_node_does_not_have_says_so(client, capsys, tmp_path):
    """Said once the node's other topics have been seen without these for a moment, long
    before the timeout (discovery on a loaded machine took over 3 s: a short timeout made this
    "no node answered")."""
    started = time.monotonic()
    status, _, err = ctl(
        capsys, "save-frame", str(tmp_path), "--camera", "front", "--timeout", "120"
    )
    assert time.monotonic() - started < 100  # not the timeout
    assert (status, err) == (
        1,
        "ovss-ctl: /ovss publishes no /ovss/front/overlay, /ovss/front/labels: is the camera "
        "name one of its cameras parameter?\n",
    )


def test_play_without_a_subscriber_says_so(capsys, photos):
    isolate_dds()
    status, out, err = ctl(
        capsys, "play", str(photos), "--topic", "/nobody_listens", "--timeout", "2"
    )
    assert status == 1 and out == ""
    assert err.strip() == (
        "ovss-ctl: nothing subscribed to /nobody_listens within 2 s: is the node running, in "
        "this ROS_DOMAIN_ID, with its input on that topic?"
    )


def test_lifecycle_of_the_plain_node_says_it_has_no_such_service(client, capsys):
    """At once, once the node's other services are seen (it waited out its 120 s timeout)."""
    start = time.monotonic()
    status, _, err = ctl(capsys, "lifecycle", "get", "--timeout", "120")
    assert time.monotonic() - start < 60
    assert status == 1, err
    assert err.strip() == (
        "ovss-ctl: /ovss has no service /ovss/get_state (only ovss_lifecycle_node has it)"
    )


def test_lifecycle_transitions_of_the_managed_node(node, capsys):
    managed = node[2]
    target = ("--node", "/ovss_managed", "--timeout", str(startup_timeout(2)))
    status, out, err = ctl(capsys, "lifecycle", "get", *target)
    assert (status, out) == (0, "unconfigured\n"), err + managed.output()
    status, _, err = ctl(capsys, "lifecycle", "activate", *target)  # not offered unconfigured
    assert status == 1 and "activate" in err and "unconfigured" in err
    for transition, state in (
        ("configure", "inactive"),
        ("activate", "active"),
        ("deactivate", "inactive"),
        ("cleanup", "unconfigured"),
        ("shutdown", "finalized"),
    ):
        status, out, err = ctl(capsys, "lifecycle", transition, *target)
        assert (status, out) == (0, f"{state}\n"), err + managed.output()


@pytest.mark.parametrize(
    "argv",
    [
        ["--node", "/elsewhere", "get", "--all", "--timeout", "1"],
        ["get", "--all", "--node", "/elsewhere", "--timeout", "1"],
        ["--node", "/ovss", "get", "--all", "--node", "/elsewhere", "--timeout", "1"],
    ],
)
def test_node_may_come_before_or_after_the_command(capsys, argv):
    isolate_dds()
    status, _, err = ctl(capsys, *argv)
    assert status == 1 and err.startswith("ovss-ctl: no node /elsewhere answered"), err


def test_a_node_that_does_not_exist_ends_the_wait_with_its_reason(capsys):
    isolate_dds()
    start = time.monotonic()
    status, out, err = ctl(capsys, "get", "--all", "--node", "/nobody", "--timeout", "2")
    assert status == 1 and out == ""
    assert err.strip() == (
        "ovss-ctl: no node /nobody answered within 2 s: is it running, in this ROS_DOMAIN_ID?"
    )
    assert time.monotonic() - start < 2 + EVENT_TIMEOUT_S / 3


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["set", "dense.crop"], "a value for every name"),
        (["get"], "names or --all"),
        (["get", "a", "--all"], "names or --all"),
        (["get", "a", "--timeout", "0"], "positive number of seconds"),
        (["get", "a", "--timeout", "nan"], "positive number of seconds"),
        (["get", "a", "--node", "/bad name"], "not a valid node name"),
        (["lifecycle", "explode"], "invalid choice"),
        (["save-frame", "out", "--camera", "9front"], "not a camera name"),
        (["save-frame", "/dev/null/out"], "is not a folder"),
        (["save-frame", "/proc/no_such_dir"], "cannot write in '/proc'"),
        (["save-frame", ""], "OUT_DIR is empty"),
        (["diagnostics", "--onc"], "unrecognized arguments"),
        (["set", "dense.crop", "224", "dense.crop", "300"], "dense.crop given twice"),
        (["play"], "required"),
        (["play", "/no/such/photo.jpg"], "'/no/such/photo.jpg' does not exist"),
        (["play", "/dev/null"], "not a regular file or folder"),
        (["play", str(Path(__file__).parent), "--rate", "2"], "no images in"),
        (["play", __file__], "is not an image OpenCV can read"),
        (["play", str(DATA_VOC), "--rate", "0"], "positive number of frames/s"),
        (["play", str(DATA_VOC), "--rate", "inf"], "positive number of frames/s"),
        (["play", str(DATA_VOC), "--rate", "1e9"], "--rate must be at most 100 frames/s"),
        (["play", str(DATA_VOC), "--topic", "bad topic"], "not a valid topic name"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, text):
    status, out, err = ctl(capsys, *argv)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("ovss-ctl") and text in err, err


@pytest.mark.parametrize(
    ("text", "parameter_type", "value"),
    [
        ("224", ParameterType.PARAMETER_INTEGER, 224),
        ("1", ParameterType.PARAMETER_DOUBLE, 1.0),
        ("0.25", ParameterType.PARAMETER_DOUBLE, 0.25),
        ("1", ParameterType.PARAMETER_STRING, "1"),  # a string parameter takes the text as is
        ("true", ParameterType.PARAMETER_STRING, "true"),
        ("false", ParameterType.PARAMETER_BOOL, False),
        ("[1, 2]", ParameterType.PARAMETER_DOUBLE_ARRAY, [1.0, 2.0]),
        ("['a', 'b; c']", ParameterType.PARAMETER_STRING_ARRAY, ["a", "b; c"]),
        ("224", ParameterType.PARAMETER_NOT_SET, 224),  # undeclared: as YAML reads it
        # YAML 1.1 reads these as strings; a params file's YAML 1.2, and float(), as numbers
        ("1e-1", ParameterType.PARAMETER_DOUBLE, 0.1),
        ("1e3", ParameterType.PARAMETER_DOUBLE, 1000.0),
        ("[1e-1, 2]", ParameterType.PARAMETER_DOUBLE_ARRAY, [0.1, 2.0]),
        ("9223372036854775807", ParameterType.PARAMETER_INTEGER, 2**63 - 1),
        ("-9223372036854775808", ParameterType.PARAMETER_INTEGER, -(2**63)),
    ],
)
def test_a_value_is_typed_by_the_parameters_descriptor(text, parameter_type, value):
    typed = typed_value(text, parameter_type)
    assert typed == value and type(typed) is type(value)
    if isinstance(value, list):
        assert [type(item) for item in typed] == [type(item) for item in value]


@pytest.mark.parametrize(
    ("text", "parameter_type"),
    [
        ("1.5", ParameterType.PARAMETER_INTEGER),
        ("true", ParameterType.PARAMETER_INTEGER),
        ("nan", ParameterType.PARAMETER_DOUBLE),
        ("1", ParameterType.PARAMETER_BOOL),
        ("cup", ParameterType.PARAMETER_STRING_ARRAY),
        ("[1, 'a']", ParameterType.PARAMETER_INTEGER_ARRAY),
        # beyond ROS's 64-bit integers (rclpy raised OverflowError, then SystemError)
        ("9223372036854775808", ParameterType.PARAMETER_INTEGER),
        ("99999999999999999999", ParameterType.PARAMETER_INTEGER),
        ("[1, 99999999999999999999]", ParameterType.PARAMETER_INTEGER_ARRAY),
        ("1e309", ParameterType.PARAMETER_DOUBLE),
        ("inf", ParameterType.PARAMETER_DOUBLE),
        ("1e", ParameterType.PARAMETER_DOUBLE),
    ],
)
def test_a_value_of_another_type_is_refused_naming_the_type(text, parameter_type):
    with pytest.raises(ValueError, match="takes "):
        typed_value(text, parameter_type)


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_tool_left_running():
    """A test that fails mid-way leaves no ovss-ctl child running."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def tool_process(*argv: str) -> subprocess.Popen:
    """ovss-ctl as its console script runs it, in a child process in the test's ROS domain."""
    script = "import sys; from ovss_ros.cli.ctl import main; sys.exit(main())"
    process = subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(process)
    return process


def test_diagnostics_prints_until_ctrl_c(client):
    tool = tool_process("diagnostics", "--timeout", WAIT)
    lines: list[str] = []
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while sum(line.startswith("ovss: image: ") for line in lines) < 2:
        assert time.monotonic() < deadline and tool.poll() is None, lines
        lines.append(tool.stdout.readline())
    tool.send_signal(signal.SIGINT)
    _, err = tool.communicate(timeout=EVENT_TIMEOUT_S)
    assert tool.returncode == 0 and err == "", err
    assert "  vocabulary size: 3\n" in lines


def test_a_reader_that_stops_early_ends_the_tool_quietly(client):
    """`ovss-ctl get --all | head -1`: the pipe's reader is gone before the tool writes; it
    ends with status 0 and no message (it said '[Errno 32] Broken pipe', status 2)."""
    tool = tool_process("get", "--all", "--timeout", WAIT)
    tool.stdout.close()  # the reader is gone long before the node answers
    _, err = tool.communicate(timeout=EVENT_TIMEOUT_S)
    assert tool.returncode == 0 and err == "", err


def test_the_tool_loads_no_model_library():
    code = (
        "import sys; from ovss_ros.cli.ctl import main; "
        "status = main(['get', '--all', '--node', '/nobody', '--timeout', '1']); "
        "print(status, sorted({'torch', 'open_clip', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=child_environment(), capture_output=True, text=True
    )
    assert done.stdout.strip() == "1 []", done.stdout + done.stderr
