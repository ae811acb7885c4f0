"""Helpers for tests that talk to the node over real DDS, isolated for each test run.

- ``isolate_dds()``: a ROS_DOMAIN_ID of its own for this test run (claimed with a lock file, so
  parallel runs on one machine never share one), discovery kept on localhost, and a Fast DDS
  profile with a 16 MiB shared-memory segment (a 640x480 rgb8 frame is larger than the default
  512 KB one and would be lost under BEST_EFFORT) and UDP pinned to 127.0.0.1.
- ``NodeProcess``: the node in its own process (``python -m ovss_ros.ros.node --ros-args -p ...``,
  or a console script of setup.py exactly as ``ros2 run`` starts it), its output in a file,
  stopped with SIGINT like Ctrl-C.
- ``spin_until``: spin the test's node until a condition holds. Discovery takes 0.1-2.4 s, so tests
  poll for what they need and never sleep a fixed time.

Waiting: every wait is for an event (a message, a service, a log line, a process status) with a
limit generous enough for a 2-core machine with other work running beside the tests: a node
process pays seconds of imports (torch) before anything else, so whatever waits on a node
starting gets STARTUP_TIMEOUT_S (more when several start together: ``startup_timeout``); a node
that runs answers within EVENT_TIMEOUT_S.
- ``OvssClient``: the other side of the graph (one camera or several), with /diagnostics.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import rclpy
from rclpy.client import Client
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from ovss_ros.ros.local_dds_profile import LOCAL_LARGE_FRAMES_PROFILE

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "data"
TINY_MODEL = DATA_DIR / "tiny-vit.json"
VOC_IMAGES = Path(
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc/JPEGImages"
)
# Limits of the waits (seconds): generous on purpose; a passing test never waits them out.
# A node process starting: imports, model, vocabulary, discovery (under a load of 6 on 2 cores two
# processes importing torch together took over 120 s).
STARTUP_TIMEOUT_S = 240.0
EVENT_TIMEOUT_S = 30.0  # a running node: an output, a service answer, a status, discovery
STOP_TIMEOUT_S = 60.0  # a node process ending after a signal
# A service call that got no answer in this time is sent again (``call_service``).
ATTEMPT_TIMEOUT_S = 5.0
# An input writer whose node's statuses, received since the writer matched a reader, have said
# for this long that it counts no publisher is replaced (``OvssClient.inputs_matched``); at most
# MAX_RENEWALS times per input topic.
ONE_SIDED_RENEW_S = 20.0
MAX_RENEWALS = 3


def _now() -> float:
    """The clock of the renewal rule (a function, so that a test can move it)."""
    return time.monotonic()


def startup_timeout(processes: int = 1) -> float:
    """The limit for one of ``processes`` node processes that start together: they share the
    CPU, so each may take that many times longer (half of it on two cores)."""
    return STARTUP_TIMEOUT_S * max(1.0, processes / 2)


# The tiny random CLIP: fast on two CPU cores, nothing downloaded.
TINY_NODE_PARAMETERS = {
    "model": str(TINY_MODEL),
    "pretrained": "none",
    "short_side": 64,
    "templates": "single",
}


# Domain IDs 1..100 keep Fast DDS's port numbers within range; 0 is what everyone else uses.
_DOMAIN_IDS = range(1, 101)
_claimed: dict[str, Any] = {}


def _claim_domain_id() -> int:
    """A domain ID no other test run on this machine holds: start from the pid, lock a file."""
    lock_dir = Path(tempfile.gettempdir()) / "ovss_ros_test_domains"
    lock_dir.mkdir(exist_ok=True)
    first = os.getpid() % len(_DOMAIN_IDS)
    for offset in range(len(_DOMAIN_IDS)):
        domain_id = _DOMAIN_IDS[(first + offset) % len(_DOMAIN_IDS)]
        handle = open(lock_dir / f"{domain_id}.lock", "w")  # held (locked) for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _claimed["lock"] = handle  # released when this process ends
        return domain_id
    raise RuntimeError("no free ROS_DOMAIN_ID for the test run")


def isolate_dds() -> dict[str, str]:
    """Set (once per process) and return the environment every ROS process of the test needs.

    Call before ``rclpy.init``: the domain and the Fast DDS profile are read when the context
    and its participant are created.
    """
    if "env" not in _claimed:
        profile = Path(tempfile.gettempdir()) / f"ovss_ros_fastdds_{os.getpid()}.xml"
        profile.write_text(LOCAL_LARGE_FRAMES_PROFILE)
        atexit.register(profile.unlink, missing_ok=True)
        env = {
            "ROS_DOMAIN_ID": str(_claim_domain_id()),
            "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
            "FASTDDS_DEFAULT_PROFILES_FILE": str(profile),
            "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
            "HF_HUB_OFFLINE": "1",
        }
        os.environ.update(env)
        _claimed["env"] = env
    return dict(_claimed["env"])


def child_environment() -> dict[str, str]:
    """Environment of a node process: this process's, the DDS isolation, the repo importable."""
    env = dict(os.environ)
    env.update(isolate_dds())
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")  # as the tests: conftest.py
    return env


def ros_argument(value: Any) -> str:
    """A parameter value as ``-p name:=value`` reads it (YAML; JSON is valid YAML)."""
    return json.dumps(value)


def console_script(name: str) -> tuple[str, str]:
    """(module, function) of a console script declared in setup.py, e.g. ``ovss_node``."""
    text = (REPO_ROOT / "setup.py").read_text()
    match = re.search(rf'"{re.escape(name)}\s*=\s*([\w.]+):(\w+)"', text)
    if match is None:
        raise ValueError(f"no console script {name!r} in setup.py")
    return match[1], match[2]


class NodeProcess:
    """The ovss node in a child process, with its console output captured in a file.

    ``module``: run as ``python -m module``. ``executable``: a console script of setup.py
    (``ovss_node``, ``ovss_lifecycle_node``), run as pip's and colcon's generated script runs it
    (import the entry function, ``sys.exit`` its result), without needing it installed.
    """

    def __init__(
        self,
        parameters: Mapping[str, Any] | None = None,
        extra_ros_args: Sequence[str] = (),
        module: str = "ovss_ros.ros.node",
        executable: str | None = None,
    ) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="ovss_node_", suffix=".log")[1])
        if executable is not None:
            entry_module, function = console_script(executable)
            script = f"import sys; from {entry_module} import {function}; sys.exit({function}())"
            command = [sys.executable, "-c", script]
        else:
            command = [sys.executable, "-m", module]
        # Extra arguments (remaps, --params-file) first: a later -p wins over a params file.
        args = [*command, "--ros-args", *extra_ros_args]
        for name, value in (parameters or {}).items():
            args += ["-p", f"{name}:={ros_argument(value)}"]
        self.args = args
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=child_environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def output(self) -> str:
        """Everything the node printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Wait for the process to end on its own; return its exit status."""
        return self.process.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_for_output(self, text: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until the node has printed ``text`` (fail if it ends or the time runs out)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.returncode is not None:
                raise AssertionError(
                    f"node ended ({self.returncode}) before printing {text!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output()}")
            time.sleep(0.01)

    def handles_signals(self) -> bool:
        """True once the process catches SIGTERM (Python's default does not): the node's own
        handlers are installed. Read from /proc/<pid>/status (SigCgt, a hex mask)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return False
        caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)
        return bool(caught & (1 << (signal.SIGTERM - 1)))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Ctrl-C the node and wait; escalate to SIGTERM and SIGKILL if it does not end."""
        if self.process.poll() is None:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                self.process.send_signal(sig)
                try:
                    self.process.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


def shutdown_problems(output: str) -> list[str]:
    """Lines of a node's output that a clean shutdown never prints: errors, tracebacks, an
    abort, a failed publish."""
    markers = ("[ERROR]", "Traceback", "terminate called", "context is invalid", "Aborted")
    return [line for line in output.splitlines() if any(m in line for m in markers)]


def spin_until(
    node: Node,
    predicate: Callable[[], Any],
    timeout: float = EVENT_TIMEOUT_S,
    executor: SingleThreadedExecutor | None = None,
    message: str | Callable[[], str] = "",
) -> Any:
    """Spin ``node`` until ``predicate()`` is truthy; return that value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s waiting: {text}")
        if executor is not None:
            executor.spin_once(timeout_sec=min(0.05, remaining))
        else:
            rclpy.spin_once(node, timeout_sec=min(0.05, remaining))


def first_done(node: Node, futures: Sequence[Any], seconds: float) -> Any:
    """Spin ``node`` for up to ``seconds`` until one of ``futures`` is done; that one or None."""
    end = time.monotonic() + max(seconds, 0.0)
    while True:
        done = next((future for future in futures if future.done()), None)
        if done is not None or (remaining := end - time.monotonic()) <= 0:
            return done
        rclpy.spin_once(node, timeout_sec=min(0.05, remaining))


class ServiceRetried(UserWarning):
    """A service call of the tests needed more than one attempt (``call_service``)."""


class DiscoveryRenewed(UserWarning):
    """A node did not match the client's input writer; the writer was replaced
    (``OvssClient.inputs_matched``)."""


def call_service(
    node: Node,
    client: Client,
    request: Any,
    timeout: float = EVENT_TIMEOUT_S,
    attempt_s: float = ATTEMPT_TIMEOUT_S,
) -> Any:
    """Call a service once its server is discovered, sending the request again while no
    response comes; return the first response (of any attempt).

    A server can drop a response: rmw_fastrtps sends it only once the server has matched the
    client's response reader, and gives up after a short wait ("failed to send response
    (timeout): client will not receive response"), which under load happens in the first
    seconds after discovery. A robust client therefore sends the request again after
    ``attempt_s`` without an answer. Only for requests whose repetition does no harm (every
    query, setting the same parameter values); lifecycle transitions: ``Lifecycle.transition``.
    """
    spin_until(node, client.service_is_ready, timeout, message=f"service {client.srv_name}")
    deadline = time.monotonic() + timeout
    futures = []
    try:
        while True:
            futures.append(client.call_async(request))
            answered = first_done(node, futures, min(attempt_s, deadline - time.monotonic()))
            if answered is not None:
                if len(futures) > 1:  # visible in pytest's warnings summary, never silent
                    warnings.warn(
                        f"{client.srv_name} answered after {len(futures)} attempts",
                        ServiceRetried,
                        stacklevel=2,
                    )
                return answered.result()
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting: response from {client.srv_name} "
                    f"({len(futures)} attempts)"
                )
    finally:
        for future in futures:
            if not future.done():
                client.remove_pending_request(future)


def topic_names(node: Node) -> set[str]:
    return {name for name, _types in node.get_topic_names_and_types()}


def published_topics(node: Node, prefix: str = "") -> set[str]:
    """Topics under ``prefix`` that have a publisher (a subscriber alone keeps a name alive)."""
    return {
        name
        for name in topic_names(node)
        if name.startswith(prefix) and node.count_publishers(name) > 0
    }


def stamp_key(header: Any) -> tuple[int, int, str]:
    """What identifies a frame across topics: its stamp and frame_id."""
    return (header.stamp.sec, header.stamp.nanosec, header.frame_id)


class OvssClient:
    """The test's side of the graph: feeds the node images, records everything it publishes.

    Every received message is kept per topic, so a test can find the outputs of one input frame by
    its header, whatever order they arrive in.
    """

    def __init__(
        self,
        node_namespace: str = "/ovss",
        input_namespace: str = "",
        name: str = "ovss_test_client",
        reliable_input: bool = False,
        cameras: Sequence[str] = (),
    ) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.srv import GetParameters, SetParameters
        from rclpy.qos import (
            DurabilityPolicy,
            QoSProfile,
            ReliabilityPolicy,
            qos_profile_sensor_data,
        )
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image
        from std_srvs.srv import SetBool
        from vision_msgs.msg import LabelInfo

        self.ns = node_namespace
        self.node = Node(name)
        self.messages: dict[str, list[Any]] = {}
        self._input_watch: dict[str, list] = {}  # input topic -> inputs_matched's state
        self._renewals: dict[str, int] = {}  # input topic -> writers replaced
        self.diagnostics_received = 0  # arrays received on /diagnostics, ever
        self._subscriptions: dict[str, Any] = {}
        inputs = input_namespace.rstrip("/")
        # A camera driver's usual QoS; a RELIABLE one also serves RELIABLE subscriptions. Its
        # writer history is deep: with depth 1 a frame the node's reader had not acknowledged
        # was replaced by the next (10 of 450 frames lost at 30 Hz under a load average of 4).
        input_qos = (
            QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
            if reliable_input
            else qos_profile_sensor_data
        )
        # Camera "front": front/image... in, <node>/front/labels... out; "" = the single camera.
        self.cameras = list(cameras) or [""]
        self.image_pubs: dict[str, Any] = {}
        self.camera_info_pubs: dict[str, Any] = {}
        self.reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=20,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        for camera in self.cameras:
            prefix = f"{inputs}/{camera}" if camera else inputs
            self.image_pubs[camera] = self.node.create_publisher(
                Image, f"{prefix}/image", input_qos
            )
            self.camera_info_pubs[camera] = self.node.create_publisher(
                CameraInfo, f"{prefix}/camera_info", qos_profile_sensor_data
            )
            outputs = f"{self.ns}/{camera}" if camera else self.ns
            for topic in ("labels", "overlay", "confidence"):
                self.subscribe(f"{outputs}/{topic}", Image)
            self.subscribe(f"{outputs}/camera_info", CameraInfo)
            self.subscribe(f"{outputs}/label_info", LabelInfo, latched)
        self.camera_info_pub = self.camera_info_pubs[self.cameras[0]]
        first = f"{inputs}/{self.cameras[0]}" if self.cameras[0] else inputs
        self.compressed_pub = self.node.create_publisher(
            CompressedImage, f"{first}/image/compressed", input_qos
        )
        self.messages["/diagnostics"] = []
        self._subscriptions["/diagnostics"] = self.node.create_subscription(
            DiagnosticArray, "/diagnostics", self.record_diagnostics, self.reliable
        )
        self.set_client = self.node.create_client(SetParameters, f"{self.ns}/set_parameters")
        self.get_client = self.node.create_client(GetParameters, f"{self.ns}/get_parameters")
        self.enable_client = self.node.create_client(SetBool, f"{self.ns}/enable")
        self._image_type = Image

    def subscribe(self, topic: str, message_type: type, qos: Any = None) -> None:
        if topic in self._subscriptions:
            return
        self.messages.setdefault(topic, [])
        self._subscriptions[topic] = self.node.create_subscription(
            message_type, topic, self.messages[topic].append, qos or self.reliable
        )

    @property
    def image_pub(self) -> Any:
        """The first camera's image publisher (a new one after ``renew_input``)."""
        return self.image_pubs[self.cameras[0]]

    def ready(self, compressed: bool = False) -> bool:
        """Every camera's input is matched on both sides (``inputs_matched``) and its
        label_info has arrived."""
        return self.inputs_matched(compressed) and all(
            self.messages[self.topic(f"{camera}/label_info" if camera else "label_info")]
            for camera in self.cameras
        )

    def inputs_matched(self, compressed: bool = False) -> bool:
        """Each input writer (the compressed one, or every camera's image) counts a reader, and
        the node's newest word on that topic counts at least one publisher on it
        (``node_input_publishers``, from the statuses received since this call first saw the
        writer count a reader).

        Discovery can stay one-sided: once in about ten CI runs a node never matched the
        client's image writer in 240 s, while that writer counted the node's reader and the
        node's own publishers reached the client (Fast DDS 3.2.3; not reproduced here). Frames
        then never arrive. When such statuses have said 0 publishers for ONE_SIDED_RENEW_S
        (counted from the first of them received), this call replaces the writer by a new one
        (``renew_input``, a DiscoveryRenewed warning; at most MAX_RENEWALS times per topic).
        Whether a new writer cures that fault is not known (it was never reproduced); a wait
        that still ends in a timeout shows both counts (``describe``)."""
        inputs = [self.compressed_pub] if compressed else list(self.image_pubs.values())
        matched = True
        for pub in inputs:
            topic = pub.topic_name
            if pub.get_subscription_count() == 0:
                self._input_watch.pop(topic, None)  # the watch restarts at the next match
                matched = False
                continue
            # [diagnostics_received at the match, when a status saying 0 was first received]
            watch = self._input_watch.setdefault(topic, [self.diagnostics_received, None])
            publishers = self.node_input_publishers(topic, since=watch[0])
            if publishers is not None and publishers > 0:
                watch[1] = None
                continue
            matched = False
            if publishers == 0:
                watch[1] = _now() if watch[1] is None else watch[1]
                one_sided_s = _now() - watch[1]
                if one_sided_s > ONE_SIDED_RENEW_S and self._renewals.get(topic, 0) < MAX_RENEWALS:
                    self.renew_input(topic, one_sided_s)
        return matched

    def node_input_publishers(self, topic: str, since: int = 0) -> int | None:
        """The "input publishers" value of the newest status naming ``topic`` as its "input
        topic", among the /diagnostics arrays received after the first ``since``
        (``diagnostics_received`` counts them; those forgotten by ``clear`` are not looked at).
        None while there is none, or when a newer status of the same name names no input topic
        (that node was unsubscribed since: e.g. deactivated and activated again). Any node's
        status naming the topic counts; in the tests each node has input topics of its own."""
        arrays = self.messages["/diagnostics"]
        newer = self.diagnostics_received - since
        unsubscribed: set[str] = set()
        for array in reversed(arrays[-newer:] if newer > 0 else []):
            for status in array.status:
                values = status_values(status)
                if "input topic" not in values:
                    unsubscribed.add(status.name)
                elif values["input topic"] == topic and "input publishers" in values:
                    if status.name in unsubscribed:
                        return None
                    return int(values["input publishers"])
        return None

    def renew_input(self, topic: str, one_sided_s: float) -> None:
        """Replace the writer of input ``topic`` by a new one with the same QoS (``one_sided_s``:
        for the warning, how long the node's statuses said 0)."""
        self._renewals[topic] = self._renewals.get(topic, 0) + 1
        warnings.warn(
            f"the node's statuses counted no publisher on {topic} for {one_sided_s:.1f} s while "
            "the writer counted a reader: writer replaced "
            f"(renewal {self._renewals[topic]} of at most {MAX_RENEWALS})",
            DiscoveryRenewed,
            stacklevel=2,
        )
        self._input_watch.pop(topic, None)
        if topic == self.compressed_pub.topic_name:
            self.compressed_pub = self._replace(self.compressed_pub)
            return
        for camera, pub in self.image_pubs.items():
            if pub.topic_name == topic:
                self.image_pubs[camera] = self._replace(pub)

    def _replace(self, pub: Any) -> Any:
        new = self.node.create_publisher(pub.msg_type, pub.topic_name, pub.qos_profile)
        self.node.destroy_publisher(pub)
        return new

    def record_diagnostics(self, array: Any) -> None:
        """Keep a received /diagnostics array (the subscription's callback)."""
        self.diagnostics_received += 1
        self.messages["/diagnostics"].append(array)

    def subscribe_mask(self, slug: str, camera: str = "") -> str:
        topic = f"{self.ns}/{camera}/masks/{slug}" if camera else f"{self.ns}/masks/{slug}"
        self.subscribe(topic, self._image_type)
        return topic

    def unsubscribe(self, topic: str) -> None:
        subscription = self._subscriptions.pop(topic, None)
        if subscription is not None:
            self.node.destroy_subscription(subscription)

    def spin_until(
        self, predicate: Callable[[], Any], timeout: float = EVENT_TIMEOUT_S, message: Any = ""
    ) -> Any:
        return spin_until(self.node, predicate, timeout, message=message)

    def spin_for(self, seconds: float) -> None:
        """Spin for a fixed time: only for checking that something does NOT arrive."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            rclpy.spin_once(self.node, timeout_sec=min(0.05, remaining))

    def topic(self, name: str) -> str:
        """Absolute name of a node output: ``labels`` -> ``/ovss/labels``."""
        return name if name.startswith("/") else f"{self.ns}/{name}"

    def find(self, topic: str, header: Any) -> Any:
        """The message on ``topic`` with the same stamp and frame_id as ``header``, or None."""
        key = stamp_key(header)
        for message in reversed(self.messages.get(self.topic(topic), [])):
            if stamp_key(message.header) == key:
                return message
        return None

    def clear(self) -> None:
        """Forget the messages received so far (they hold whole images)."""
        for messages in self.messages.values():
            messages.clear()

    def wait_for_output(
        self,
        message: Any,
        topics: Sequence[str] = ("labels",),
        timeout: float = EVENT_TIMEOUT_S,
        resend_every: float = 1.0,
        publisher: Any = None,
    ) -> dict[str, Any]:
        """Publish ``message`` until each output topic has a message with its header.

        Resending covers the first frames after discovery, which BEST_EFFORT may drop; outputs
        are matched by header, so a repeat does no harm. Returns topic (as given) -> message.
        ``publisher``: another camera's (``image_pubs[name]``); default: the first camera's.
        """
        if publisher is None:
            compressed = "Compressed" in type(message).__name__
            publisher = self.compressed_pub if compressed else self.image_pub
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= next_send:
                publisher.publish(message)
                next_send = now + resend_every
            found = {topic: self.find(topic, message.header) for topic in topics}
            if all(output is not None for output in found.values()):
                return found
            if now >= deadline:
                missing = [topic for topic, output in found.items() if output is None]
                raise AssertionError(
                    f"no output on {missing} within {timeout} s; the client:\n{self.describe()}"
                )
            rclpy.spin_once(self.node, timeout_sec=0.02)

    def statuses(self, name: str) -> list[Any]:
        """Every diagnostic_msgs/DiagnosticStatus called ``name`` received so far, oldest first."""
        return [
            status
            for array in self.messages["/diagnostics"]
            for status in array.status
            if status.name == name
        ]

    def wait_for_status(
        self,
        name: str,
        predicate: Callable[[dict[str, str]], Any],
        timeout: float = EVENT_TIMEOUT_S,
    ) -> Any:
        """The first newly received status ``name`` whose key/values satisfy ``predicate``."""
        seen = len(self.statuses(name))

        def found() -> Any:
            for status in self.statuses(name)[seen:]:
                if predicate(status_values(status)):
                    return status
            return None

        return self.spin_until(
            found,
            timeout,
            message=lambda: f"status {name!r}; last: {self.statuses(name)[-1:]}",
        )

    def counter(self, name: str, status: str = "ovss: image") -> int:
        """The newest value of the diagnostics counter ``name`` (``frames rejected``, ...) in the
        status ``status``, waiting for a status that has it."""
        self.spin_until(
            lambda: any(name in status_values(s) for s in self.statuses(status)),
            message=f"a status {status!r} with {name!r}",
        )
        values = [status_values(s) for s in self.statuses(status)]
        return int([v for v in values if name in v][-1][name])

    def publish_until_counted(
        self,
        message: Any,
        counter: str = "frames rejected",
        status: str = "ovss: image",
        publisher: Any = None,
        timeout: float = EVENT_TIMEOUT_S,
        resend_every: float = 2.0,
    ) -> None:
        """Publish ``message`` (again every ``resend_every`` s) until the node's diagnostics
        count one more ``counter`` than before: the node has taken it. Pacing on a fixed pause
        instead fails on a busy machine, where a frame still waiting in the node's newest-frame
        slot is replaced, unseen, by the next one."""
        publisher = publisher or (
            self.compressed_pub if "Compressed" in type(message).__name__ else self.image_pub
        )
        before = self.counter(counter, status)
        deadline = time.monotonic() + timeout
        while True:
            publisher.publish(message)
            resend = time.monotonic() + resend_every
            while time.monotonic() < resend:
                if self.counter(counter, status) > before:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{counter!r} did not grow within {timeout} s")
                rclpy.spin_once(self.node, timeout_sec=0.05)

    def set_parameters(self, parameters: Sequence[Parameter]) -> list[Any]:
        from rcl_interfaces.srv import SetParameters

        request = SetParameters.Request(parameters=[p.to_parameter_msg() for p in parameters])
        return call_service(self.node, self.set_client, request).results

    def get_parameter(self, name: str) -> Any:
        from rcl_interfaces.srv import GetParameters

        response = call_service(self.node, self.get_client, GetParameters.Request(names=[name]))
        return parameter_value(response.values[0])

    def describe_parameter(self, name: str) -> Any:
        from rcl_interfaces.srv import DescribeParameters

        if not hasattr(self, "_describe_client"):
            self._describe_client = self.node.create_client(
                DescribeParameters, f"{self.ns}/describe_parameters"
            )
        request = DescribeParameters.Request(names=[name])
        return call_service(self.node, self._describe_client, request).descriptors[0]

    def enable(self, enabled: bool) -> Any:
        from std_srvs.srv import SetBool

        return call_service(self.node, self.enable_client, SetBool.Request(data=enabled))

    def describe(self) -> str:
        """What this client sees, for a failure message: who is matched on each of its topics,
        how many messages each brought, and the last diagnostics report received."""
        lines = [
            f"{pub.topic_name}: {pub.get_subscription_count()} subscription(s); the node's "
            f"newest diagnostics: {self.node_input_publishers(pub.topic_name)} publisher(s); "
            f"writer replaced {self._renewals.get(pub.topic_name, 0)} time(s)"
            for pub in [*self.image_pubs.values(), self.compressed_pub]
        ]
        for topic, messages in self.messages.items():
            if topic != "/diagnostics":
                publishers = self.node.count_publishers(topic)
                lines.append(f"{topic}: {publishers} publisher(s), {len(messages)} received")
        for array in self.messages.get("/diagnostics", [])[-1:]:
            for status in array.status:
                values = ", ".join(f"{k.key}={k.value}" for k in status.values)
                lines.append(f"last diagnostics {status.name!r}: {status.message} [{values}]")
        return "\n".join(lines)

    def destroy(self) -> None:
        self.node.destroy_node()


class Lifecycle:
    """The ChangeState / GetState clients of one managed node (``node``: its full name)."""

    def __init__(self, client: OvssClient, node: str) -> None:
        from lifecycle_msgs.srv import ChangeState, GetState

        self.client = client
        self.change = client.node.create_client(ChangeState, f"{node}/change_state")
        self.get = client.node.create_client(GetState, f"{node}/get_state")

    def state(self, timeout: float = EVENT_TIMEOUT_S) -> str:
        """The node's state label (``unconfigured``, ``inactive``, ``active``, ``finalized``)."""
        from lifecycle_msgs.srv import GetState

        request = GetState.Request()
        return call_service(self.client.node, self.get, request, timeout).current_state.label

    def request(self, transition_id: int) -> Any:
        """Ask for a transition without waiting for it: the future of the ChangeState call."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        spin_until(self.client.node, self.change.service_is_ready, STARTUP_TIMEOUT_S)
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self.change.call_async(request)

    def transition(self, transition_id: int, timeout: float = STARTUP_TIMEOUT_S) -> bool:
        """Make a transition (configure loads a model: a start-up's limit); True on success.

        A response can be lost (``call_service``), and a transition must not simply be sent
        twice: when no answer came within ``ATTEMPT_TIMEOUT_S``, the node's state says what
        happened (``get_state`` is answered once the transition is over: one executor thread):
        in the transition's goal state, it succeeded; still in the state it started from, the
        request is sent again; any other state ends the wait with False.
        """
        from lifecycle_msgs.msg import Transition

        goals = {
            Transition.TRANSITION_CONFIGURE: "inactive",
            Transition.TRANSITION_CLEANUP: "unconfigured",
            Transition.TRANSITION_ACTIVATE: "active",
            Transition.TRANSITION_DEACTIVATE: "inactive",
            Transition.TRANSITION_UNCONFIGURED_SHUTDOWN: "finalized",
            Transition.TRANSITION_INACTIVE_SHUTDOWN: "finalized",
            Transition.TRANSITION_ACTIVE_SHUTDOWN: "finalized",
        }
        deadline = time.monotonic() + timeout
        start_state = self.state(timeout)
        node = self.client.node
        futures = []
        try:
            while True:
                futures.append(self.request(transition_id))
                answered = first_done(node, futures, ATTEMPT_TIMEOUT_S)
                if answered is not None:
                    return answered.result().success
                state = self.state(max(EVENT_TIMEOUT_S, deadline - time.monotonic()))
                if answered := next((f for f in futures if f.done()), None):
                    return answered.result().success
                if state == goals.get(transition_id):
                    return True  # done; its response was lost
                if state != start_state or time.monotonic() >= deadline:
                    return False
        finally:
            for future in futures:
                if not future.done():
                    self.change.remove_pending_request(future)

    def activate(self) -> None:
        """Configure, then activate (the caller waits for the inputs to be subscribed)."""
        from lifecycle_msgs.msg import Transition

        assert self.transition(Transition.TRANSITION_CONFIGURE), "configure failed"
        assert self.transition(Transition.TRANSITION_ACTIVATE), "activate failed"


def status_values(status: Any) -> dict[str, str]:
    """A DiagnosticStatus's key/values as a dict."""
    return {entry.key: entry.value for entry in status.values}


def parameter_value(value: Any) -> Any:
    """The Python value of an rcl_interfaces/ParameterValue."""
    from rclpy.parameter import parameter_value_to_python

    return parameter_value_to_python(value)


_frame_counter = [0]


def next_header(node: Node, frame_id: str = "camera") -> Any:
    """A header no other frame of the run has: now, plus a counter in the nanoseconds."""
    from std_msgs.msg import Header

    _frame_counter[0] += 1
    stamp = node.get_clock().now().to_msg()
    return Header(stamp=stamp, frame_id=f"{frame_id}_{_frame_counter[0]}")


def make_image(array: Any, encoding: str, header: Any) -> Any:
    """A sensor_msgs/Image built by hand (not by the code under test)."""
    from sensor_msgs.msg import Image

    height, width = array.shape[:2]
    return Image(
        header=header,
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=array.strides[0],
        data=array.tobytes(),
    )


def camera_frame(width: int = 640, height: int = 480) -> Any:
    """A real VOC photo resized to a camera's frame size, RGB uint8 (benchmarks and soak)."""
    import cv2

    bgr = cv2.imread(str(sorted(VOC_IMAGES.glob("*.jpg"))[0]))
    return cv2.cvtColor(cv2.resize(bgr, (width, height)), cv2.COLOR_BGR2RGB)


def make_compressed(data: bytes, header: Any, image_format: str = "jpeg") -> Any:
    from sensor_msgs.msg import CompressedImage

    return CompressedImage(header=header, format=image_format, data=data)


def image_array(message: Any) -> Any:
    """The pixels of an output Image (mono8, mono16, rgb8, 32FC1), checked against its step."""
    import numpy as np

    dtype, channels = {
        "mono8": (np.uint8, 1),
        "mono16": (np.uint16, 1),
        "rgb8": (np.uint8, 3),
        "32FC1": (np.float32, 1),
    }[message.encoding]
    row = message.width * channels * np.dtype(dtype).itemsize
    assert message.step == row, f"step {message.step} != {row}"
    assert len(message.data) == message.step * message.height
    array = np.frombuffer(bytes(message.data), dtype=dtype)
    if message.is_bigendian:
        array = array.byteswap()
    shape = (message.height, message.width) + ((channels,) if channels > 1 else ())
    return array.reshape(shape)


@contextmanager
def running_node(
    parameters: Mapping[str, Any],
    extra_ros_args: Sequence[str] = (),
    node_namespace: str = "/ovss",
    input_namespace: str = "",
    compressed: bool = False,
    reliable_input: bool = False,
    ready_timeout: float = STARTUP_TIMEOUT_S,
    cameras: Sequence[str] = (),
) -> Iterator[tuple[OvssClient, NodeProcess]]:
    """Start the node and a client; yield once the node is subscribed and its label_info is in.

    On the way out the node gets Ctrl-C and must exit with status 0 (a clean shutdown).
    ``cameras``: the names the node is given in its ``cameras`` parameter (not passed for you).
    """
    isolate_dds()
    process = NodeProcess(parameters, extra_ros_args)
    rclpy.init()
    client = OvssClient(
        node_namespace, input_namespace, reliable_input=reliable_input, cameras=cameras
    )
    try:
        client.spin_until(
            lambda: process.returncode is not None or client.ready(compressed),
            ready_timeout,
            message=lambda: (
                f"node start-up; its output:\n{process.output()}\nthe client:\n{client.describe()}"
            ),
        )
        if process.returncode is not None:
            raise AssertionError(f"node exited with {process.returncode}:\n{process.output()}")
        yield client, process
    finally:
        client.destroy()
        rclpy.shutdown()
        returncode = process.stop()
    if returncode != 0:
        raise AssertionError(f"node did not shut down cleanly ({returncode}):\n{process.output()}")
    process.log_path.unlink(missing_ok=True)


# At import, i.e. while pytest collects, before any test creates a participant: Fast DDS reads its
# profiles file once per process, so a later isolate_dds() would be too late for the XML.
isolate_dds()
