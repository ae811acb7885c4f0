"""ovss-bag: segment an image topic of a rosbag2 into a new bag with the node's output topics.

    ovss-bag run1 run1_ovss --topic /camera/image_raw --classes person "cup; mug"

Reads a sqlite3 or MCAP bag (sensor_msgs/Image or CompressedImage topic) and writes a new bag:
the input topics copied through plus <ns>/labels, <ns>/label_info, <ns>/masks/<slug> and
<ns>/overlay, stamped with each input frame's header and bag time, as if ovss_node had run
live during the recording. Each input frame is written together with its outputs, so the bag
always holds what the last line reports. Exit status: 0 all frames segmented, 1 some frames were
skipped (undecodable, over --max-input-pixels, or segmentation failed; the bag is still written)
or an error reading or writing the bags stopped the run, 2 bad arguments, bag, topic or engine
settings, 130 Ctrl-C and 143 SIGTERM (the bag holds the frames finished so far).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args, parse_engine_args
from ovss_ros.cli.input_limits import add_max_input_pixels_argument
from ovss_ros.cli.tool_parser import ToolParser
from ovss_ros.core.clip.errors import ModelLoadError
from ovss_ros.core.vocabulary import VocabularyError, parse_classes
from ovss_ros.ros.bag import (
    COPY_CHOICES,
    STORAGES,
    BagError,
    BagJob,
    BagReport,
    OutputTopics,
    segment_bag,
)
from ovss_ros.ros.signals import StopSignals

logger = logging.getLogger("ovss-bag")


def build_parser() -> ToolParser:
    """ovss-bag's flags: its own, then every engine setting's (``engine_args``)."""
    parser = ToolParser(
        prog="ovss-bag",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("input_bag", type=Path, help="rosbag2 folder (or a .mcap / .db3 file)")
    parser.add_argument("output_bag", type=Path, help="new bag folder to write (must not exist)")
    parser.add_argument("--topic", required=True, help="image topic to segment")
    parser.add_argument("--classes", nargs="+", required=True, help="class names ('a; synonym')")
    parser.add_argument(
        "--storage", choices=list(STORAGES), help="output storage (default: same as the input)"
    )
    parser.add_argument("--namespace", default="/ovss", help="prefix of the output topics")
    parser.add_argument("--no-masks", action="store_true", help="no <ns>/masks/<slug> topics")
    parser.add_argument("--no-overlay", action="store_true", help="no <ns>/overlay topic")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument(
        "--no-legend", action="store_true", help="no legend (classes and colours) on the overlay"
    )
    parser.add_argument(
        "--copy",
        choices=COPY_CHOICES,
        default="all",
        help="input topics copied into the output bag: all (default), only the image topic, none",
    )
    add_max_input_pixels_argument(parser)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar of frames done (default: on a terminal only)",
    )
    add_engine_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_engine_args(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        # Everything checkable without the model first: a typo should not cost a model load.
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}")
        classes = parse_classes(args.classes)
        outputs = OutputTopics.under(
            args.namespace, classes, masks=not args.no_masks, overlay=not args.no_overlay
        )
        job = BagJob.plan(
            args.input_bag, args.output_bag, args.topic, outputs, args.storage, args.copy
        )
        config = config_from_args(args)
        config.validate()
        from ovss_ros.core.segmenter import Segmenter  # the model libraries: arguments checked

        segmenter = Segmenter(config)
        segmenter.set_classes(classes)
        notice, warn = segmenter.method_notice()  # e.g. the DeOP release's own input size
        if notice != config.method:
            (logger.warning if warn else logger.info)("method %s", notice)
    except (BagError, ModelLoadError, VocabularyError, ValueError) as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads: no bag was started
        logger.warning("interrupted before the first frame; nothing written")
        return 130
    logger.info(
        "segmenting %d frames of %s (%s) into %s (%s)",
        job.frames,
        job.image_topic,
        job.image_type,
        job.output_path,
        job.storage,
    )
    # Signals are handled until the summary is out; warnings print above the progress bar.
    with StopSignals() as stop, logging_redirect_tqdm():
        report = segment_bag(
            job,
            segmenter,
            alpha=args.alpha,
            legend=not args.no_legend,
            progress=args.progress,
            max_pixels=args.max_input_pixels,
            stop=stop,
        )
        status = _summarise(job, report)
        if stop.received is not None:
            stop.ignore_further()  # told to stop: only the exit is left, a second Ctrl-C waits
    return status


def _summarise(job: BagJob, report: BagReport) -> int:
    """Log what the bag holds (exactly); the exit status says whether every frame made it."""
    for topic, count in report.written.items():
        logger.info("%s: %d messages", topic, count)
    skipped = len(report.skipped)
    if skipped:
        causes = ", ".join(f"{n} {cause}" for cause, n in report.skip_counts().items())
        logger.warning(
            "skipped %d of %d frames (%s); first: %s",
            skipped,
            report.frames,
            causes,
            report.skipped[0].reason,
        )
    if job.copy == "none":
        holds = f"{job.output_path} holds the outputs of {report.segmented} frames"
    else:
        holds = (
            f"{job.output_path} holds {report.copied_frames} input frames and the outputs of "
            f"{report.segmented}"
        )
    done = (
        f"{report.frames} of {job.frames} frames ({report.segmented} segmented, {skipped} skipped)"
    )
    if report.interrupted:
        logger.warning("interrupted by %s after %s: %s", report.stop_signal, done, holds)
        return 128 + int(signal.Signals[report.stop_signal])
    if report.error:
        logger.error("stopped by an error after %s: %s; %s", done, report.error, holds)
        return 1
    logger.info("finished %s: %s", done, holds)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
