"""``ovss-ctl``: control a running ovss node without the ros2 command line (the venv of
``scripts/setup.sh`` has no ros2cli), and beside it.

    ovss-ctl get dense.crop method          ovss-ctl get --all
    ovss-ctl set dense.crop 224 score_threshold 0.1     (one atomic request: all or nothing)
    ovss-ctl classes "cup" "door handle; handle"        ovss-ctl classes
    ovss-ctl method sclip                   ovss-ctl enable | disable
    ovss-ctl lifecycle configure|activate|deactivate|cleanup|shutdown|get
    ovss-ctl diagnostics [--once]           ovss-ctl save-frame OUT_DIR [--camera NAME]
    ovss-ctl play IMAGE_OR_FOLDER... [--rate 2] [--topic /image] [--loop]   (a camera from files)

Every subcommand takes ``--node`` (default ``/ovss``) and ``--timeout`` (seconds). Values are read
as YAML, as ``ros2 param set`` reads them, then typed by the node's own descriptor of the
parameter (``set score_threshold 1`` sends the double 1.0). Exit status: 0 done, 1 the node
refused (its reason on stderr) or did not answer in time, 2 bad arguments (one line on stderr),
130 Ctrl-C (``diagnostics`` and ``play --loop`` end with Ctrl-C: 0).
The services and topics are the node's: docs/ros_interface.md; this tool: docs/ovss_ctl.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ovss_ros.cli.tool_parser import INTERRUPTED, ToolParser, bad_input, one_line

PROG = "ovss-ctl"
REFUSED = 1  # the node refused, or did not answer in time
MAX_RATE = 100.0  # frames/s of play: a camera's rate, not a flood
LIFECYCLE = ("configure", "activate", "deactivate", "cleanup", "shutdown", "get")


def _positive(unit: str) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 of ``unit``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit}: {text!r}")
        return value

    return parse


_seconds = _positive("seconds")


def build_parser() -> ToolParser:
    parser = ToolParser(
        prog=PROG,
        description="Control a running ovss node (parameters, classes, method, enable, "
        "lifecycle, diagnostics, frames) over ROS 2, and play image files to it as a camera.",
        epilog="Exit status: 0 done, 1 the node refused or did not answer, 2 bad arguments, 130 "
        "Ctrl-C (diagnostics and play --loop: 0).",
    )
    # --node before or after the command: the command's own (given) wins.
    node_help = "the ovss node's full name (default: /ovss)"
    parser.add_argument("--node", default="/ovss", help=node_help)
    common = ToolParser(add_help=False)
    common.add_argument("--node", default=argparse.SUPPRESS, help=node_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, timeout: float = 10.0) -> ToolParser:
        child = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        child.add_argument(
            "--timeout",
            type=_seconds,
            default=timeout,
            help="seconds to wait for the node (default: %(default)s)",
        )
        return child

    get = command("get", "print parameter values as 'name: value' lines")
    get.add_argument("names", nargs="*", metavar="NAME", help="parameter names")
    get.add_argument("--all", action="store_true", help="every parameter of the node")
    setter = command("set", "set parameters in one atomic request (all or nothing)")
    setter.add_argument("pairs", nargs="+", metavar="NAME VALUE", help="name value pairs")
    classes = command("classes", "set the vocabulary, or print it with no argument")
    classes.add_argument("classes", nargs="*", metavar="CLASS", help="one entry per class")
    method = command("method", "switch the method (set method NAME)")
    method.add_argument("method", metavar="NAME", help="e.g. naclip, sclip, pnp_ovss")
    command("enable", "resume inference (~/enable true)")
    command("disable", "pause inference (~/enable false)")
    lifecycle = command(
        "lifecycle",
        "a lifecycle transition of ovss_lifecycle_node, or its state (get); configure loads "
        "the model",
        timeout=120.0,
    )
    lifecycle.add_argument("transition", choices=LIFECYCLE)
    diagnostics = command("diagnostics", "print the node's /diagnostics statuses until Ctrl-C")
    diagnostics.add_argument("--once", action="store_true", help="print one message and exit")
    save = command("save-frame", "write the next overlay and labels frame as PNG files")
    save.add_argument("out_dir", metavar="OUT_DIR", help="folder for the PNG files")
    save.add_argument("--camera", default="", help="a camera of the node's cameras parameter")
    play = command("play", "publish image files as a camera on the node's input topic")
    play.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders of them")
    play.add_argument(
        "--rate", type=_positive("frames/s"), default=2.0, help="frames/s (default: %(default)s)"
    )
    play.add_argument(
        "--topic",
        default="/image",
        help="where to publish (default: %(default)s, the input of a node started without remaps)",
    )
    play.add_argument(
        "--frame-id", default="camera", help="header.frame_id (default: %(default)s)"
    )
    play.add_argument("--loop", action="store_true", help="round again until Ctrl-C")
    return parser


def check_arguments(parser: ToolParser, args: argparse.Namespace) -> None:
    """Refuse what no node could accept, before any ROS work (exit 2)."""
    from rclpy.validate_full_topic_name import validate_full_topic_name

    args.node = args.node if args.node.startswith("/") else f"/{args.node}"
    try:
        validate_full_topic_name(args.node)
    except Exception as error:
        parser.error(f"--node {args.node!r} is not a valid node name ({one_line(error)})")
    if args.command == "get" and bool(args.names) == bool(args.all):
        parser.error("get: give parameter names or --all (not both)")
    if args.command == "set" and len(args.pairs) % 2:
        parser.error(f"set: a value for every name (got {len(args.pairs)} words: NAME VALUE ...)")
    if args.command == "set":
        names = args.pairs[::2]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            parser.error(f"set: {twice[0]} given twice (one value per parameter)")
    if args.command == "play" and args.rate > MAX_RATE:
        parser.error(
            f"--rate must be at most {MAX_RATE:g} frames/s (as ovss-demo's), got {args.rate:g}"
        )
    if args.command == "play":
        from rclpy.validate_topic_name import validate_topic_name

        from ovss_ros.cli.ctl_play import read_frames

        try:
            validate_topic_name(args.topic)
        except Exception as error:
            parser.error(f"--topic {args.topic!r} is not a valid topic name ({one_line(error)})")
        try:
            args.frames = read_frames(args.inputs)
        except ValueError as error:
            parser.error(one_line(error))
    if args.command == "save-frame":
        from ovss_ros.ros.topic_names import CAMERA_NAME

        if args.camera and (not CAMERA_NAME.fullmatch(args.camera) or "__" in args.camera):
            parser.error(f"--camera {args.camera!r} is not a camera name (a ROS name token)")
        if not args.out_dir.strip():
            parser.error("OUT_DIR is empty: name a folder")
        args.out_dir = Path(args.out_dir)
        from ovss_ros.cli.tool_parser import writable_folder

        try:
            writable_folder(args.out_dir, f"OUT_DIR {str(args.out_dir)!r}")
        except ValueError as error:
            parser.error(str(error))


class Refused(Exception):
    """The node refused: the message is its reason."""


class NotFound(Refused):
    """The node has no such parameter: the message says so (with the closest name)."""


def get_values(session: Any, names: Sequence[str]) -> dict[str, Any]:
    """name -> value of the target's parameters; Refused for a name it does not have."""
    from rcl_interfaces.srv import GetParameters, ListParameters
    from rclpy.parameter import parameter_value_to_python

    known = set(
        session.call(ListParameters, "list_parameters", ListParameters.Request()).result.names
    )
    names = sorted(known) if not names else list(names)
    missing = [name for name in names if name not in known]
    if missing:
        import difflib

        from ovss_ros.core.config import RENAMED

        close = difflib.get_close_matches(missing[0], sorted(known), n=1)
        if missing[0] in RENAMED:
            hint = f" ({missing[0]} was renamed {RENAMED[missing[0]]})"
        else:
            hint = f" (did you mean {close[0]}?)" if close else ""
        raise NotFound(f"{session.target} has no parameter {missing[0]!r}{hint}")
    response = session.call(GetParameters, "get_parameters", GetParameters.Request(names=names))
    if len(response.values) != len(names):
        raise Refused(f"{session.target} answered no values for {names}")
    return {n: parameter_value_to_python(v) for n, v in zip(names, response.values, strict=True)}


def set_values(session: Any, texts: dict[str, str]) -> dict[str, Any]:
    """Set the parameters (name -> value text) in one set_parameters_atomically request, each
    typed by the node's descriptor; return name -> value sent. Raises Refused with the node's
    reason, or ValueError for a value of the wrong type."""
    from rcl_interfaces.srv import DescribeParameters, SetParametersAtomically
    from rclpy.parameter import Parameter

    from ovss_ros.cli.ctl_values import typed_value

    names = list(texts)
    described = session.call(
        DescribeParameters, "describe_parameters", DescribeParameters.Request(names=names)
    ).descriptors
    # An undeclared (e.g. renamed) name gets no descriptor: sent as YAML reads it; the node
    # refuses it with its reason.
    types = {d.name: d.type for d in described} if len(described) == len(names) else {}
    values = {}
    for name, text in texts.items():
        try:
            values[name] = typed_value(text, types.get(name, 0))
        except ValueError as error:
            raise ValueError(f"{name} {error}") from None
    request = SetParametersAtomically.Request(
        parameters=[
            Parameter(name, value=value).to_parameter_msg() for name, value in values.items()
        ]
    )
    result = session.call(SetParametersAtomically, "set_parameters_atomically", request).result
    if not result.successful:
        raise Refused(result.reason or "refused without a reason")
    return values


def run(args: argparse.Namespace, session: Any) -> int:
    """Do ``args.command`` through ``session``; the exit status."""
    from ovss_ros.cli.ctl_values import value_text

    if args.command == "get":
        for name, value in get_values(session, args.names).items():
            print(f"{name}: {value_text(value)}")
    elif args.command in ("set", "method") or (args.command == "classes" and args.classes):
        if args.command == "set":
            texts = dict(zip(args.pairs[::2], args.pairs[1::2], strict=True))
        elif args.command == "method":
            texts = {"method": args.method}
        else:
            texts = {"classes": value_text(list(args.classes))}
        for name, value in set_values(session, texts).items():
            print(f"{name}: {value_text(value)}")
    elif args.command == "classes":
        for index, entry in enumerate(get_values(session, ["classes"])["classes"]):
            print(f"{index}: {entry}")
    elif args.command in ("enable", "disable"):
        from std_srvs.srv import SetBool

        request = SetBool.Request(data=args.command == "enable")
        response = session.call(SetBool, "enable", request)
        if not response.success:
            raise Refused(response.message or f"{args.command} refused")
        print(response.message)
    elif args.command == "lifecycle":
        return lifecycle(session, args.transition, args.timeout)
    elif args.command == "diagnostics":
        from ovss_ros.cli.ctl_topics import watch_diagnostics

        watch_diagnostics(session, args.once)
    elif args.command == "play":
        from ovss_ros.cli.ctl_play import play

        sent = play(session, args.frames, args.topic, args.rate, args.loop, args.frame_id)
        print(f"published {sent} frames")
    elif args.command == "save-frame":
        from ovss_ros.cli.ctl_topics import save_frame

        for path in save_frame(session, args.out_dir, args.camera):
            print(path)
    return 0


def lifecycle(session: Any, transition: str, seconds: float) -> int:
    """A lifecycle transition by name (shutdown from the state the node is in), or ``get``."""
    from lifecycle_msgs.msg import Transition

    state = session.lifecycle_state()
    if transition == "get":
        print(state)
        return 0
    shutdowns = {
        "unconfigured": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
        "inactive": Transition.TRANSITION_INACTIVE_SHUTDOWN,
        "active": Transition.TRANSITION_ACTIVE_SHUTDOWN,
    }
    ids = {
        "configure": (Transition.TRANSITION_CONFIGURE, "inactive"),
        "activate": (Transition.TRANSITION_ACTIVATE, "active"),
        "deactivate": (Transition.TRANSITION_DEACTIVATE, "inactive"),
        "cleanup": (Transition.TRANSITION_CLEANUP, "unconfigured"),
        "shutdown": (shutdowns.get(state, Transition.TRANSITION_ACTIVE_SHUTDOWN), "finalized"),
    }
    transition_id, goal = ids[transition]
    success, after = session.transition(transition_id, goal, seconds)
    if not success:
        raise Refused(f"{transition} failed or is not offered in state {state!r} (now {after!r})")
    print(after)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # diagnostics and play --loop end here normally (status 0)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    from ovss_ros.cli.ctl_session import NoAnswer, Session

    try:
        with Session(args.node, args.timeout) as session:
            return run(args, session)
    except ValueError as error:
        bad_input(PROG, error)
    except NotFound as error:
        print(f"{PROG}: {one_line(error)}", file=sys.stderr)
        return REFUSED
    except Refused as error:
        print(f"{PROG}: {args.node} refused: {one_line(error)}", file=sys.stderr)
        return REFUSED
    except BrokenPipeError:  # e.g. `ovss-ctl get --all | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (NoAnswer, OSError) as error:
        print(f"{PROG}: {one_line(error)}", file=sys.stderr)
        return REFUSED


if __name__ == "__main__":
    sys.exit(main())
