"""ovss-demo: one command that shows the node working on this machine.

    ovss-demo                                   # sample images, default or random weights
    ovss-demo --images photos/ --classes cup "door; door handle" --then-classes person chair
    ovss-demo --bag my_bag/ --topic /camera/image_raw --rate 5 --output demo_out/

It starts the node in its own process on a ROS domain of its own (``--domain-id``, default a
random one in 101..199, printed) with discovery kept on this host, plays the images (a folder,
the VOC samples when installed, else the synthetic scenes the package ships; or a bag's image
topic) as a camera on the node's input topic at ``--rate`` Hz, changes the vocabulary once
through the node's parameter service (``--classes`` until frame ``--change-after``, then
``--then-classes``), and writes the overlays it receives plus one line per frame (vocabulary in
force, classes present with pixel shares, latency) to stdout and ``DIR/summary.txt``.

Weights: the node's default weights when they are in the local Hugging Face cache (or, with
``--download``, when the hub can be reached); otherwise one line says so and the node runs a
small random open_clip model shipped in the package, labelled RANDOM WEIGHTS on every summary
line and overlay. Exit status: 0 done, 2 bad arguments (one line), 1 the node failed (its error
line), 130 stopped by Ctrl-C (the node is stopped cleanly first). Arguments are checked before
torch or rclpy is imported.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
from pathlib import Path

from ovss_ros.cli.demo_options import (
    DEFAULT_CLASSES,
    DEFAULT_THEN_CLASSES,
    DEVICE_PATTERN,
    DOMAIN_IDS,
    SHIPPED_IMAGES,
    VOC_IMAGES,
    DemoArgs,
    raise_terminated,
)
from ovss_ros.cli.tool_parser import IMAGE_SUFFIXES, ToolParser, bad_input, writable_folder


def build_parser() -> ToolParser:
    parser = ToolParser(
        prog="ovss-demo",
        description="Start the ovss node, play images as a camera, change the vocabulary once, "
        "write the overlays and a per-frame summary.",
        epilog="Without cached weights (and without --download) the node runs a small RANDOM "
        "model: the labels are then meaningless; the run shows the pipeline works.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--images",
        metavar="DIR",
        help="folder of images to play (default: the VOC samples when installed, else the "
        "synthetic scenes shipped with ovss_ros)",
    )
    source.add_argument("--bag", metavar="PATH", help="rosbag2 folder (or .mcap/.db3) to play")
    parser.add_argument(
        "--topic",
        help="the bag's sensor_msgs/Image or CompressedImage topic (default: its only one)",
    )
    parser.add_argument("--frames", type=int, help="play at most this many frames (default: all)")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="frames per second offered (default: 1.0)"
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        default=list(DEFAULT_CLASSES),
        help=f"vocabulary at the start (default: {' '.join(DEFAULT_CLASSES)})",
    )
    parser.add_argument(
        "--then-classes",
        nargs="+",
        default=list(DEFAULT_THEN_CLASSES),
        help=f"vocabulary after the change (default: {' '.join(DEFAULT_THEN_CLASSES)})",
    )
    parser.add_argument(
        "--change-after",
        type=int,
        help="change the vocabulary after this many frames (default: half of them, at least 1)",
    )
    parser.add_argument(
        "--output",
        default="ovss_demo_output",
        help="folder for the overlays and summary.txt (default: ovss_demo_output)",
    )
    parser.add_argument(
        "--domain-id",
        type=int,
        help="ROS_DOMAIN_ID of the demo's graph (default: a random one in 101..199)",
    )
    parser.add_argument(
        "--device", help="auto | cpu | cuda | cuda:N (default: cuda when present, else cpu)"
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download the default weights when they are not cached (about 600 MB)",
    )
    parser.add_argument(
        "--frame-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for one frame's outputs (default: 300)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the node to start (default: 600)",
    )
    return parser


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def default_images() -> Path:
    """The VOC samples when installed (scripts/setup.sh), else the shipped synthetic scenes."""
    if VOC_IMAGES.is_dir() and _image_files(VOC_IMAGES):
        return VOC_IMAGES
    return SHIPPED_IMAGES


def _check_vocabulary(flag: str, entries: list[str]) -> None:
    from ovss_ros.core.vocabulary import parse_classes

    try:
        parse_classes(entries)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def check_arguments(argv: list[str] | None) -> DemoArgs:
    """Parse and check; one line on stderr and exit 2 for anything wrong. No torch, no rclpy."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.topic is not None and args.bag is None:
            raise ValueError("--topic is for --bag")
        images: list[Path] = []
        bag = None
        if args.bag is not None:
            bag = Path(args.bag).expanduser()
            if not bag.exists():
                raise ValueError(f"--bag {args.bag!r} does not exist")
        else:
            folder = Path(args.images).expanduser() if args.images else default_images()
            if not folder.is_dir():
                raise ValueError(f"--images {str(folder)!r} is not a folder")
            images = _image_files(folder)
            if not images:
                raise ValueError(
                    f"--images {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
        if args.frames is not None and args.frames < 1:
            raise ValueError(f"--frames must be at least 1, got {args.frames}")
        if not (math.isfinite(args.rate) and 0 < args.rate <= 100):
            raise ValueError(f"--rate must be in (0, 100] Hz, got {args.rate}")
        for flag, value in (
            ("--frame-timeout", args.frame_timeout),
            ("--startup-timeout", args.startup_timeout),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
        if args.change_after is not None and args.change_after < 1:
            raise ValueError(f"--change-after must be at least 1, got {args.change_after}")
        _check_vocabulary("--classes", args.classes)
        _check_vocabulary("--then-classes", args.then_classes)
        if args.domain_id is not None and not 0 <= args.domain_id <= 232:
            raise ValueError(f"--domain-id must be in [0, 232], got {args.domain_id}")
        if args.device is not None and not DEVICE_PATTERN.match(args.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
        if not args.output.strip():
            raise ValueError("--output is empty: name a folder")
        output = Path(args.output).expanduser()
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output {args.output!r} exists and is not a folder")
        for parent in output.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"--output {args.output!r}: {str(parent)!r} is not a folder")
                break
        from ovss_ros.cli.demo_media import read_bag, read_images

        if bag is not None:
            frames = read_bag(bag, args.topic, args.frames)
            source = f"bag {bag}"
        else:
            frames = read_images(images, args.frames)
            source = str(images[0].parent)
        if args.change_after is not None and args.change_after >= len(frames):
            raise ValueError(
                f"--change-after {args.change_after}: the vocabulary would never change (it "
                f"changes after that frame; {len(frames)} frames play)"
            )
        written = ["summary.txt", "node.log"]
        written += [f"overlay_{index:04d}.png" for index in range(1, len(frames) + 1)]
        for name in written:  # what the demo writes there: no folder, device or link in it
            if (output / name).is_symlink():
                raise ValueError(f"--output {args.output!r}: {name} there is a link")
            if os.path.lexists(output / name) and not (output / name).is_file():
                raise ValueError(f"--output {args.output!r}: {name} there is not a file")
        writable_folder(output, f"--output {args.output!r}")
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--output {args.output!r} cannot be created: {error}") from None
    except ValueError as error:
        bad_input(prog, error)
    domain_chosen = args.domain_id is not None
    return DemoArgs(
        frames=frames,
        source=source,
        rate=args.rate,
        classes=list(args.classes),
        then_classes=list(args.then_classes),
        change_after=args.change_after,
        output=output,
        domain_id=args.domain_id if domain_chosen else random.choice(DOMAIN_IDS),
        domain_chosen=domain_chosen,
        device=args.device,
        download=args.download,
        frame_timeout=args.frame_timeout,
        startup_timeout=args.startup_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ovss-demo``; the exit status (module docstring)."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # from the start: 143, said
    try:
        args = check_arguments(argv)
        from ovss_ros.cli.demo_run import run_demo  # torch/rclpy only after the checks

        return run_demo(args)
    except KeyboardInterrupt as stop:  # before the node started (run_demo handles it after)
        from ovss_ros.cli.demo_run import stopped

        return stopped(stop)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
