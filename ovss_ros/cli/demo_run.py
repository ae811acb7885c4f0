"""ovss-demo's run (after its arguments are checked): choose the weights, start the node in its
own process on the demo's ROS domain, play the frames, change the vocabulary, write what comes
back (``demo.py`` says what the demo does and its exit statuses)."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import cv2

from ovss_ros.cli.demo_media import RANDOM_WARNING, annotated
from ovss_ros.cli.demo_options import (
    DOMAIN_IDS,
    RANDOM_MODEL,
    DemoArgs,
    Terminated,
    raise_terminated,
)
from ovss_ros.cli.demo_session import FrameResult, Session, StartupError
from ovss_ros.ros.local_dds_profile import LOCAL_LARGE_FRAMES_PROFILE

STOP_TIMEOUT_S = 60.0  # the node ending after each of SIGINT, SIGTERM
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Weights:
    """What the node loads: open_clip ``model`` and ``pretrained``, and whether it is random."""

    model: str
    pretrained: str
    random: bool
    note: str  # one line for the user


def choose_weights(download: bool) -> Weights:
    """The node's default weights when cached (or downloadable with ``download``), else the
    shipped random model. Never downloads anything itself (``hub_access``: cache, one probe)."""
    from ovss_ros.core.clip import hub_access
    from ovss_ros.core.clip.model_loading import tag_files
    from ovss_ros.core.config import EngineConfig

    defaults = EngineConfig()
    model, tag = defaults.model, defaults.pretrained
    files = tag_files(model, tag)
    what = f"the default weights ({model} {tag})"
    if files is not None and hub_access.cached_file(files[0], files[1]):
        return Weights(model, tag, False, f"{what} are in the local cache: using them")
    if files is not None and download:
        problem = hub_access.unavailable(what, files[0], files[-1][-1], "no download possible")
        if problem is None:
            return Weights(model, tag, False, f"{what}: downloading them (about 600 MB)")
        reason = problem
    elif download:
        reason = f"{what} are not on the Hugging Face hub"
    else:
        reason = f"{what} are not in the local cache (pass --download to fetch them)"
    return Weights(
        str(RANDOM_MODEL), "none", True, f"{reason}; running a small RANDOM model instead"
    )


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def node_parameters(args: DemoArgs, weights: Weights, device: str) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "model": weights.model,
        "pretrained": weights.pretrained,
        "device": device,
        "classes": args.classes,
    }
    if weights.random:  # the tiny model's own input size: quick on any CPU
        parameters.update({"short_side": 64, "templates": "single"})
    return parameters


def node_environment(args: DemoArgs, weights: Weights, profile: Path) -> dict[str, str]:
    """The demo's own graph: its domain, discovery on this host, large frames over SHM."""
    env = {
        "ROS_DOMAIN_ID": str(args.domain_id),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "PYTHONUNBUFFERED": "1",
        "RCUTILS_LOGGING_BUFFERED_STREAM": "0",
    }
    if not os.environ.get("RMW_IMPLEMENTATION"):
        env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        profile.write_text(LOCAL_LARGE_FRAMES_PROFILE)
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    if weights.random or not args.download:
        env["HF_HUB_OFFLINE"] = "1"  # nothing to fetch: the node never touches the network
    return env


def _stop_with_parent(parent: int) -> None:
    """In the node's process before it runs (Linux): SIGTERM when the demo ends in any way, even
    killed (prctl PR_SET_PDEATHSIG), so no node is left serving on the demo's domain."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the demo ended before the line above
        os._exit(1)


class NodeProcess:
    """``python -m ovss_ros.ros.node`` in its own session (Ctrl-C reaches only the demo, which
    stops the node with SIGINT; the node gets SIGTERM if the demo dies without that), its output
    in ``log``."""

    def __init__(self, parameters: dict[str, Any], env: dict[str, str], log: Path) -> None:
        command = [sys.executable, "-m", "ovss_ros.ros.node", "--ros-args"]
        for name, value in parameters.items():
            command += ["-p", f"{name}:={json.dumps(value)}"]
        self.log = log
        self._file = open(log, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=self._file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=functools.partial(_stop_with_parent, os.getpid()),
        )

    def returncode(self) -> int | None:
        return self.process.poll()

    def error_line(self) -> str:
        """The node's last error line (or its last line): why it failed."""
        lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]
        errors = [ln for ln in lines if "[ERROR]" in ln or "[FATAL]" in ln or "Error" in ln]
        return (errors or lines or ["(no output)"])[-1]

    def stop(self) -> int:
        """SIGINT (Ctrl-C), then SIGTERM, then SIGKILL, each given STOP_TIMEOUT_S."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        self._file.close()
        return self.process.wait()


def stopped(stop: KeyboardInterrupt, what: str = "") -> int:
    """Say that a signal stopped the demo (and ``what`` follows); 130 for Ctrl-C, 143 SIGTERM."""
    name, status = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
    print(f"ovss-demo: stopped ({name}){what}", file=sys.stderr, flush=True)
    return status


def say(text: str) -> None:
    """A line on stdout; once the reader is gone (``ovss-demo | head``), stdout is dropped and
    the demo goes on writing its files."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Summary:
    """Lines to stdout and DIR/summary.txt at once."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = open(path, "w", encoding="utf-8")

    def line(self, text: str) -> None:
        say(text)
        self._file.write(text + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def frame_line(result: FrameResult, total: int, random_weights: bool) -> str:
    head = f"frame {result.index}/{total} {result.name}"
    if result.vocabulary is None and result.latency_s:
        return f"{head} | INCOMPLETE: labels without overlay or label_info in the frame timeout"
    if result.vocabulary is None:
        return f"{head} | NO OUTPUT within the frame timeout"
    present = ", ".join(
        f"{name} {share:.1%}" if share >= 0.0005 else f"{name} <0.1%"
        for name, share in result.shares
    )
    present = present or "nothing"
    text = (
        f"{head} | vocabulary: {', '.join(result.vocabulary)} | present: {present} "
        f"| latency {result.latency_s * 1000:.0f} ms"
    )
    return text + (" | RANDOM WEIGHTS" if random_weights else "")


# How long the demo looks for an ovss node already on its domain: a drawn domain (101-199) is
# rarely taken; on a given one (--domain-id, often a robot's) it looks longer, since discovery
# on a loaded host took over 2 s (the demo then drove the other node too).
DISCOVERY_S = 2.0
GIVEN_DOMAIN_DISCOVERY_S = 6.0


def ovss_on_domain(domain_id: int, seconds: float = DISCOVERY_S) -> bool:
    """Whether a node /ovss is on ROS domain ``domain_id`` (on this host), looked for during
    up to ``seconds``: the demo would drive that node too (frames, the vocabulary change)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        node = Node("ovss_demo_probe", context=context, start_parameter_services=False)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + seconds
        found = False
        while not found and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            found = ("ovss", "/") in node.get_node_names_and_namespaces()
        executor.shutdown()
        node.destroy_node()
        return found
    finally:
        context.try_shutdown()


def free_domain(args: DemoArgs) -> DemoArgs:
    """``args`` with a domain that has no /ovss yet: a random one is drawn again (5 tries), a
    given one is refused. Raises DomainTaken."""
    domain_id = args.domain_id
    seconds = GIVEN_DOMAIN_DISCOVERY_S if args.domain_chosen else DISCOVERY_S
    for _ in range(5):
        if not ovss_on_domain(domain_id, seconds):
            return dataclasses.replace(args, domain_id=domain_id)
        if args.domain_chosen:
            break
        domain_id = random.choice([d for d in DOMAIN_IDS if d != domain_id])
    raise DomainTaken(
        f"ROS_DOMAIN_ID={domain_id} already has a node /ovss (another ovss node or ovss-demo): "
        "the demo would drive it too; choose another --domain-id"
    )


class DomainTaken(Exception):
    """The demo's domain already has an ovss node."""


def run_demo(args: DemoArgs) -> int:
    """The whole demo; its exit status."""
    weights = choose_weights(args.download)
    device = args.device or default_device()
    profile = Path(tempfile.mkstemp(prefix="ovss_demo_fastdds_", suffix=".xml")[1])
    try:
        env = node_environment(args, weights, profile)
        os.environ.update(env)  # this process's participants join the graph (before the first)
        try:
            args = free_domain(args)
        except DomainTaken as error:
            print(f"ovss-demo: {error}", file=sys.stderr)
            return 1
        env["ROS_DOMAIN_ID"] = os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
        say(f"ovss-demo: {weights.note}")
        how = "given" if args.domain_chosen else "random; --domain-id chooses it"
        say(
            f"ovss-demo: node on ROS_DOMAIN_ID={args.domain_id} ({how}), discovery on this "
            f"host only; device {device}; its log: {args.output / 'node.log'}"
        )
        return _run_node(args, weights, device, env)
    finally:
        profile.unlink(missing_ok=True)


def _run_node(args: DemoArgs, weights: Weights, device: str, env: dict[str, str]) -> int:
    """Start the node, play, stop the node (whatever happens; further signals wait for it)."""
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, raise_terminated),
        signal.SIGINT: signal.getsignal(signal.SIGINT),
    }
    summary = Summary(args.output / "summary.txt")
    sessions: list[Session] = []
    node = NodeProcess(node_parameters(args, weights, device), env, args.output / "node.log")
    try:
        return _play(args, weights, node, summary, sessions)
    except StartupError as error:
        print(f"ovss-demo: the node failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        return stopped(stop, "; stopping the node")
    finally:
        for number in previous:  # stopping: a second Ctrl-C must not cut the node's shutdown
            signal.signal(number, signal.SIG_IGN)
        for session in sessions:
            session.close()
        status = node.stop()
        summary.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
        say(f"ovss-demo: node stopped (exit status {status})")


def _play(
    args: DemoArgs, weights: Weights, node: NodeProcess, summary: Summary, sessions: list[Session]
) -> int:
    total = len(args.frames)
    change_after = args.change_after or max(1, total // 2)
    summary.line(
        f"# ovss-demo: {total} frames from {args.source} at {args.rate:g} Hz; model "
        f"{Path(weights.model).name} pretrained {weights.pretrained}; vocabulary change "
        f"after frame {change_after}"
    )
    if weights.random:
        summary.line(f"# {RANDOM_WARNING}")
    session = Session(args.startup_timeout, node.returncode, node.error_line)
    sessions.append(session)
    session.wait_ready()
    period = 1.0 / args.rate
    segmented = 0
    for index, (name, rgb) in enumerate(args.frames, start=1):
        started = time.monotonic()
        result = session.play(index, name, rgb, args.frame_timeout)
        summary.line(frame_line(result, total, weights.random))
        if result.overlay is not None:
            segmented += 1
            picture = annotated(result.overlay, [frame_line(result, total, False)], weights.random)
            path = args.output / f"overlay_{index:04d}.png"
            if not cv2.imwrite(str(path), picture):
                summary.line(f"# {path} could not be written")
                segmented -= 1
        if node.returncode() is not None:
            summary.line(f"# the node ended ({node.returncode()}): {node.error_line()}")
            return 1
        if index == change_after and index < total:
            reason = session.set_classes(args.then_classes)
            if reason is not None:
                summary.line(f"# the node refused --then-classes: {reason}")
                return 1
            summary.line(f"# vocabulary set to: {', '.join(args.then_classes)}")
        session.wait(started + period)
    summary.line(f"# {segmented} of {total} frames segmented; overlays in {args.output}")
    return 0 if segmented == total else 1
