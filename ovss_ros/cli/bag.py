"""ovss-bag: segment an image topic of a rosbag2 into a new bag with the node's output topics.

    ovss-bag run1 run1_ovss --topic /camera/image_raw --classes person "cup; mug"

Reads a sqlite3 or MCAP bag (sensor_msgs/Image or CompressedImage topic) and writes a new bag:
the input topics copied through plus <ns>/labels, <ns>/label_info, <ns>/masks/<slug> and
<ns>/overlay, stamped with each input frame's header and bag time, as if ovss_node had run
live during the recording. Exit status: 0 all frames segmented, 1 some frames were undecodable
(skipped; the bag is still written), 2 bad arguments, bag, topic or engine settings, 130 Ctrl-C
(the bag holds the frames done so far).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from ovss_ros.bag_processing import (
    COPY_CHOICES,
    STORAGES,
    BagError,
    BagJob,
    BagReport,
    OutputTopics,
    segment_bag,
)
from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args
from ovss_ros.core import ModelLoadError, Segmenter, VocabularyError, parse_classes

logger = logging.getLogger("ovss-bag")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
        "--copy",
        choices=COPY_CHOICES,
        default="all",
        help="input topics copied into the output bag: all (default), only the image topic, none",
    )
    add_engine_arguments(parser)
    return parser.parse_args(argv)


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
        segmenter = Segmenter(config_from_args(args))
        segmenter.set_classes(classes)
    except (BagError, ModelLoadError, VocabularyError, ValueError) as error:
        logger.error("%s", error)
        return 2
    logger.info(
        "segmenting %d frames of %s (%s) into %s (%s)",
        job.frames,
        job.image_topic,
        job.image_type,
        job.output_path,
        job.storage,
    )
    with logging_redirect_tqdm():  # warnings print above the progress bar, not through it
        report = segment_bag(job, segmenter, alpha=args.alpha)
    return _summarise(job, report)


def _summarise(job: BagJob, report: BagReport) -> int:
    """Log what the bag holds; the exit status says whether every frame made it."""
    for topic, count in report.written.items():
        logger.info("%s: %d messages", topic, count)
    if report.interrupted:
        logger.warning(
            "interrupted after %d of %d frames; %s holds them",
            report.frames,
            job.frames,
            job.output_path,
        )
        return 130
    if report.skipped:
        logger.warning(
            "skipped %d of %d frames (undecodable); first: %s",
            len(report.skipped),
            report.frames,
            report.skipped[0][1],
        )
    logger.info("wrote %d segmented frames to %s", report.segmented, job.output_path)
    return 1 if report.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
