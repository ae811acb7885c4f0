"""Process entry of the ovss nodes: the console scripts ``ovss_node`` and ``ovss_lifecycle_node``
(what ``ros2 run ovss_ros ovss_node`` starts), and how SIGINT / SIGTERM end such a process.

Light on purpose: only the standard library is imported here, so the signal handlers are in place
before rclpy, torch and open_clip are imported (seconds on a small CPU). What a signal does:

- during start-up (imports, model loading, vocabulary encoding, until the node serves): it ends
  start-up at once (``Interrupted``, unwound through the node's own clean-up) and the process
  exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), without a traceback;
- while the node serves: it asks for an orderly stop (``ovss_ros.ros.node.run``): the engine's stop
  event is set (text encoding and every inference stage end early), the spin loop ends, the node
  stops its worker, then destroys its publishers, then the ROS context is shut down; exit
  status 0;
- any later signal is ignored: the shutdown under way is not interrupted, so nothing is left half
  torn down and no thread is killed inside native code.

rclpy's own signal handlers are not installed (``SignalHandlerOptions.NO``): they shut the
context down from another thread while the worker may still publish.

``-h`` / ``--help`` before any ``--ros-args`` prints usage (topics, every parameter with its type,
default, range or values, and description, from ``parameter_table.PARAMETERS``) and exits 0
without initialising ROS.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import textwrap
import threading
from collections.abc import Callable

from ovss_ros.ros.signals import Interrupted, ShutdownSignals, ignore_shutdown_signals


def run_main(main: Callable[..., int], signals: ShutdownSignals | None = None) -> int:
    """Run a node's ``main(signals=...)``; return the status for ``sys.exit``.

    Once ``main`` is done, SIGINT and SIGTERM are ignored: Python would restore their default
    action while it finalizes, and a late Ctrl-C would kill the process. If a thread is still
    alive (a worker that did not stop in time), or start-up was interrupted (maybe inside an
    import), the process ends here with ``os._exit``: an interpreter that finalizes while a
    daemon thread runs inside torch aborts ("terminate called without an active exception").
    ROS has been shut down by then; only the standard streams need flushing.
    """
    signals = signals or ShutdownSignals.install()
    interrupted = False
    try:
        try:
            status = main(signals=signals)
        finally:
            ignore_shutdown_signals()
    except Interrupted as interrupt:  # before main's own handling, e.g. in an import
        ignore_shutdown_signals()
        status, interrupted = interrupt.exit_status, True
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if interrupted or any(thread.is_alive() for thread in others):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    # The interpreter's last garbage collections walk every object torch and open_clip made
    # (seconds on a busy CPU); ROS is shut down and nothing left needs collecting.
    gc.freeze()
    return status


HELP_FLAGS = ("-h", "--help")

USAGE = """\
usage: {program} [-h] [--ros-args [-r FROM:=TO] [-p NAME:=VALUE] [--params-file FILE] ...]

{summary}

Topics (relative to the node's namespace; remap with -r, e.g. -r image:=/camera/image_raw):
  in:  image (sensor_msgs/Image; image/compressed with image_transport:=compressed),
       camera_info
  out: ~/labels, ~/label_info, ~/masks/<class>, ~/overlay, ~/confidence, ~/camera_info,
       /diagnostics; service ~/enable (std_srvs/SetBool)
  cameras:=[front, rear]: front/image -> ~/front/labels, ... (one model for all)

Large images between processes need the Fast DDS profile config/fastdds_large_data.xml:
  export FASTDDS_DEFAULT_PROFILES_FILE=<ovss_ros share>/config/fastdds_large_data.xml
(in the camera driver too; README: "Large images and DDS").

Parameters (-p NAME:=VALUE, or --params-file config/ovss.yaml; runtime ones also with
ros2 param set; read-only ones only at start-up):
"""

SUMMARIES = {
    "ovss_node": "Open-vocabulary semantic segmentation of camera images (the plain node: it "
    "loads\nits model and starts serving at once).",
    "ovss_lifecycle_node": "Open-vocabulary semantic segmentation of camera images (managed "
    "node: configure\nloads the model, activate subscribes; ros2 lifecycle set /ovss ...).",
}


def wants_help(argv: list[str]) -> bool:
    """``-h`` or ``--help`` among the arguments before ``--ros-args`` (after it, ROS's own)."""
    own = argv[: argv.index("--ros-args")] if "--ros-args" in argv else argv
    return any(arg in HELP_FLAGS for arg in own)


def usage_header(program: str) -> str:
    """What a node console script is and does, before its parameters (no imports needed)."""
    return USAGE.format(program=program, summary=SUMMARIES[program])


def parameter_help() -> str:
    """Every declared parameter, from the settings' definitions (``parameter_table``): name,
    type, runtime or start-up, default, range, description, allowed values and where the default
    comes from, wrapped to 99 columns; the parameters of earlier releases with their new names."""
    # Imports torch and rclpy's Python API: seconds.
    from ovss_ros.ros import parameter_table
    from ovss_ros.ros.parameter_spec import type_name

    lines = []
    for spec in parameter_table.PARAMETERS:
        kind = type_name(spec.default)
        if spec.name in parameter_table.STRING_ARRAYS:
            kind = "list of strings"
        facts = [
            kind,
            "start-up (read-only)" if spec.read_only else "runtime",
            f"default {spec.default!r}",
        ]
        if spec.minimum is not None:
            facts.append(f"range {spec.range_text()}")
        lines.append(f"  {spec.name} ({', '.join(facts)})")
        texts = [spec.description]
        if spec.constraints:
            texts.append(f"values: {spec.constraints}")
        if spec.definition.info.source:
            texts.append(f"default from: {spec.definition.info.source}")
        lines += [
            textwrap.fill(
                text, 99, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False
            )
            for text in texts
        ]
    lines += ["", "Names of earlier releases are refused with their new names:"]
    line = " "
    for old, new in parameter_table.RENAMED.items():  # an entry is never split across lines
        entry = f" {old} -> {new},"
        if len(line) + len(entry) > 99:
            lines.append(line)
            line = " "
        line += entry
    lines.append(line.rstrip(","))
    return "\n".join(lines) + "\n"


def print_help(program: str) -> None:
    """Usage of a node console script on stdout: the header at once, then the parameters."""
    sys.stdout.write(usage_header(program))
    sys.stdout.flush()
    sys.stdout.write(parameter_help())
    sys.stdout.flush()


def answered_help(program: str) -> bool:
    """Print the usage and return True if ``-h``/``--help`` was asked for (before
    ``--ros-args``); the console scripts and ``python -m ovss_ros.ros.node`` alike."""
    if not wants_help(sys.argv[1:]):
        return False
    try:
        print_help(program)
    except BrokenPipeError:  # e.g. `ovss_node --help | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return True


def _node_main(module: str, program: str) -> int:
    if answered_help(program):
        return 0
    signals = ShutdownSignals.install()
    return run_main(lambda **kwargs: importlib.import_module(module).main(**kwargs), signals)


def ovss_node() -> int:
    """Console script ``ovss_node``: the plain node (``ovss_ros.ros.node.OvssNode``)."""
    return _node_main("ovss_ros.ros.node", "ovss_node")


def ovss_lifecycle_node() -> int:
    """Console script ``ovss_lifecycle_node``: the managed node
    (``ovss_ros.ros.lifecycle_node``)."""
    return _node_main("ovss_ros.ros.lifecycle_node", "ovss_lifecycle_node")
