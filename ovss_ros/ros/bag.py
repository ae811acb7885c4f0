"""Segment an image topic of a recorded rosbag2 into a new bag with the node's output topics.

The output bag is what ``ros2 bag record`` would have captured with ovss_node running live on the
recording: the input topics copied through unchanged, plus ``<ns>/labels``, ``<ns>/label_info``,
``<ns>/masks/<slug>`` and ``<ns>/overlay``, each with the input frame's header and bag timestamp.

Messages go through rclpy: an input frame is deserialized into rclpy's message class and decoded
by :mod:`ovss_ros.ros.image_conversion`, and the outputs are built by the same converters the node
publishes with and serialized by ``rclpy.serialization``. So a bag frame is byte-for-byte what the
node would send, and there is one image converter to maintain, not a second one for rosbags'
dataclasses. rosbags does the bag files (sqlite3 and MCAP; ``bag_files``).

The bag always matches the report: an input frame and all its outputs are written together, after
the frame has been segmented, so a frame is in the bag with its outputs, or skipped (undecodable,
over the pixel limit, or its segmentation failed; the input copied, no outputs), or not at all.
Ctrl-C or SIGTERM, and errors reading or writing the bags, stop the run between frames and the
output bag is closed normally with the frames finished so far.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.rosbag2 import Reader, Writer
from sensor_msgs.msg import CompressedImage, Image
from tqdm import tqdm

from ovss_ros.core import ClassEntry
from ovss_ros.ros.bag_files import (
    COMPRESSED_TYPE,
    COPY_CHOICES,
    IMAGE_TYPE,
    LABEL_INFO_QOS,
    LABEL_INFO_TYPE,
    OUTPUT_QOS,
    STORAGES,
    VISION_MSGS_DEFINITIONS,
    BagError,
    OutputBag,
    bag_storage,
    copy_connections,
    count_messages,
    read_topics,
    typestore,
)
from ovss_ros.ros.image_conversion import (
    DEFAULT_MAX_INPUT_PIXELS,
    ImageTooLarge,
    compressed_to_rgb8,
    image_to_rgb8,
    mono8_to_image,
    mono16_to_image,
    rgb8_to_image,
)
from ovss_ros.ros.label_info import label_info
from ovss_ros.ros.signals import StopSignals

if TYPE_CHECKING:
    from ovss_ros.core.segmenter import Segmenter

logger = logging.getLogger(__name__)

__all__ = [
    "COPY_CHOICES",
    "LABEL_INFO_TYPE",
    "STORAGES",
    "VISION_MSGS_DEFINITIONS",
    "BagError",
    "BagJob",
    "BagReport",
    "OutputTopics",
    "decode_frame",
    "segment_bag",
    "typestore",
]

# The rclpy class and decoder for each image type the tool reads (as the node's two inputs).
IMAGE_READERS: dict[str, tuple[type, Callable[..., np.ndarray]]] = {
    IMAGE_TYPE: (Image, image_to_rgb8),
    COMPRESSED_TYPE: (CompressedImage, compressed_to_rgb8),
}
_ROS_NAMESPACE = re.compile(r"^(/[A-Za-z_][A-Za-z0-9_]*)*$")
MAX_REPORTED_SKIPS = 10  # skipped frames logged one by one; the rest are only counted
# Why a frame was skipped (its input is copied, it has no outputs).
UNDECODABLE = "undecodable"
TOO_LARGE = "over max_input_pixels"
FAILED = "segmentation failed"
SKIP_CAUSES = (UNDECODABLE, TOO_LARGE, FAILED)


def output_namespace(namespace: str) -> str:
    """``ovss``, ``/ovss/`` -> ``/ovss``; ``/`` -> ``""`` (topics at the root)."""
    normalised = "/" + namespace.strip().strip("/") if namespace.strip("/ ") else ""
    if not _ROS_NAMESPACE.match(normalised):
        raise BagError(
            f"namespace {namespace!r} is not a valid ROS name (letters, digits, _ and /; "
            "no part may start with a digit)"
        )
    return normalised


@dataclass(frozen=True)
class OutputTopics:
    """The topics the tool adds, named as the node's relative outputs under a namespace."""

    labels: str
    label_info: str
    masks: dict[str, str]  # class name -> topic; empty with --no-masks
    overlay: str | None  # None with --no-overlay

    @classmethod
    def under(
        cls, namespace: str, classes: Sequence[ClassEntry], masks: bool, overlay: bool
    ) -> OutputTopics:
        ns = output_namespace(namespace)
        return cls(
            labels=f"{ns}/labels",
            label_info=f"{ns}/label_info",
            masks={c.name: f"{ns}/masks/{c.slug}" for c in classes} if masks else {},
            overlay=f"{ns}/overlay" if overlay else None,
        )

    def names(self) -> list[str]:
        return [self.labels, self.label_info, *self.masks.values(), *filter(None, [self.overlay])]


@dataclass(frozen=True)
class BagJob:
    """A checked plan: everything about the bags is validated before the model is loaded."""

    input_path: Path
    output_path: Path
    storage: str  # of the output bag
    image_topic: str
    image_type: str  # IMAGE_TYPE or COMPRESSED_TYPE
    frames: int  # messages on the image topic
    outputs: OutputTopics
    copy: str  # which input topics go into the output: all | image | none

    @classmethod
    def plan(
        cls,
        input_path: Path,
        output_path: Path,
        image_topic: str,
        outputs: OutputTopics,
        storage: str | None = None,
        copy: str = "all",
    ) -> BagJob:
        """Check the bags, topic and output names; raise BagError saying what is wrong."""
        input_storage = bag_storage(input_path)
        storage = storage or input_storage
        if storage not in STORAGES:
            raise BagError(f"unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
        if copy not in COPY_CHOICES:
            raise BagError(f"unknown copy choice {copy!r}; use one of {', '.join(COPY_CHOICES)}")
        if output_path.exists():
            raise BagError(f"output bag {str(output_path)!r} exists already; not overwriting")
        topics = read_topics(input_path)
        if image_topic not in topics:
            images = sorted(t for t, types in topics.items() if types & IMAGE_READERS.keys())
            listed = ", ".join(f"{t} ({'/'.join(sorted(topics[t]))})" for t in images)
            raise BagError(
                f"topic {image_topic!r} is not in {input_path}; its image topics: "
                + (listed or "none")
            )
        types = topics[image_topic]
        if len(types) != 1 or not types <= IMAGE_READERS.keys():
            raise BagError(
                f"topic {image_topic!r} has type {', '.join(sorted(types))}; ovss-bag reads "
                f"{' or '.join(IMAGE_READERS)}"
            )
        if copy == "all":
            if clashes := sorted(set(outputs.names()) & topics.keys()):
                raise BagError(
                    f"the input bag already has {', '.join(clashes)}: choose another --namespace"
                )
        elif image_topic in outputs.names():
            raise BagError(f"the output topics include the input {image_topic!r}")
        frames = count_messages(input_path, image_topic)
        return cls(
            input_path, output_path, storage, image_topic, next(iter(types)), frames, outputs, copy
        )


class SkippedFrame(NamedTuple):
    timestamp: int  # bag time, ns
    reason: str
    cause: str  # one of SKIP_CAUSES


@dataclass
class BagReport:
    """What happened to the frames and what the output bag holds; it always matches the bag."""

    frames: int = 0  # input frames finished: segmented or skipped (the interrupted one is not)
    segmented: int = 0  # frames whose outputs are in the bag
    skipped: list[SkippedFrame] = field(default_factory=list)
    copied_frames: int = 0  # input frames copied into the output bag (0 unless it copies them)
    written: dict[str, int] = field(default_factory=dict)  # output topic -> messages
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM
    stop_signal: str = ""  # the signal that stopped it: SIGINT, SIGTERM
    error: str = ""  # an error reading or writing the bags that stopped the run

    def skip_counts(self) -> dict[str, int]:
        """Skipped frames by cause, causes with none left out."""
        counts = {cause: sum(s.cause == cause for s in self.skipped) for cause in SKIP_CAUSES}
        return {cause: count for cause, count in counts.items() if count}


class FrameError(ValueError):
    """An input frame that cannot be turned into an RGB image; it is skipped. ``cause`` says why
    (UNDECODABLE or TOO_LARGE)."""

    def __init__(self, reason: str, cause: str = UNDECODABLE) -> None:
        super().__init__(reason)
        self.cause = cause


def decode_frame(
    raw: bytes | memoryview, image_type: str, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS
) -> tuple[Any, np.ndarray]:
    """CDR bytes of an Image or CompressedImage -> (its std_msgs/Header, HxWx3 uint8 RGB).

    Raises:
        FrameError: not a message of ``image_type``, undecodable, or over ``max_pixels``
            (width * height, from the message or the compressed header, before decoding).
    """
    message_class, to_rgb = IMAGE_READERS[image_type]
    try:
        message = deserialize_message(bytes(raw), message_class)
    except Exception as error:  # rclpy raises RMWError for bytes that are not this type
        raise FrameError(f"not a valid {image_type} message: {error}") from error
    try:
        return message.header, to_rgb(message, max_pixels=max_pixels)
    except ImageTooLarge as error:
        raise FrameError(str(error), TOO_LARGE) from error
    except ValueError as error:  # ImageConversionError (and OpenCV's own complaints)
        raise FrameError(str(error)) from error


def segment_bag(
    job: BagJob,
    segmenter: Segmenter,
    alpha: float = 0.5,
    progress: bool | None = None,
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    stop: StopSignals | None = None,
    legend: bool = True,
) -> BagReport:
    """Run ``segmenter`` over every frame of ``job`` and write the output bag.

    Each frame is decoded and segmented and its output messages serialized first; then the input
    frame (if copied) and its outputs are written together. Frames that are undecodable, over
    ``max_pixels`` or whose segmentation raises are skipped: counted in the report with the reason
    (the first few logged), the input still copied. ``progress`` None shows the bar (frames done of
    the total) on a terminal only. Ctrl-C / SIGTERM (handled while this runs, in the main thread)
    and errors reading or writing the bags stop the run; the output bag is closed normally with the
    frames finished so far (rosbags would otherwise abort it, leaving no metadata.yaml), and
    ``report.interrupted`` / ``report.error`` tell. ``stop``: an entered StopSignals of the
    caller (to keep handling signals after this returns); by default one for this call only.
    ``alpha``, ``legend``: the overlay's colour weight and legend, as the node's parameters.
    """
    copied_topics = {"all": None, "image": {job.image_topic}, "none": set()}[job.copy]
    report = BagReport()
    store = typestore()
    if stop is None:
        stop = StopSignals()
        handling = stop
    else:
        handling = nullcontext(stop)
    with (
        handling,  # entered first, left last: signals during the closing are only recorded
        Reader(job.input_path) as reader,
        Writer(job.output_path, version=9, storage_plugin=STORAGES[job.storage]) as writer,
    ):
        if copied_topics is None:
            copied_topics = {c.topic for c in reader.connections}
        copies = copy_connections(reader, writer, store, copied_topics)
        out = OutputBag(writer, store)
        out.add_topic(job.outputs.label_info, LABEL_INFO_TYPE, LABEL_INFO_QOS)
        for topic in [job.outputs.labels, *job.outputs.masks.values(), job.outputs.overlay]:
            if topic is not None:
                out.add_topic(topic, IMAGE_TYPE, OUTPUT_QOS)
        wanted = [c for c in reader.connections if c.id in copies or c.topic == job.image_topic]
        bar = tqdm(
            total=job.frames,
            unit="frame",
            desc=job.image_topic,
            disable=None if progress is None else not progress,
        )
        writing: int | None = None  # bag time of the frame whose messages are being written
        try:
            with bar:
                for connection, timestamp, raw in reader.messages(connections=wanted):
                    if connection.topic != job.image_topic:
                        writer.write(copies[connection.id], timestamp, raw)
                        continue
                    with stop.interruptible():  # nothing of this frame is written yet
                        outputs = _frame_outputs(job, segmenter, (alpha, legend), max_pixels, raw)
                    # The frame and its outputs, together (signals now wait for the next frame).
                    writing = timestamp
                    if connection.id in copies:
                        writer.write(copies[connection.id], timestamp, raw)
                        report.copied_frames += 1
                    if isinstance(outputs, FrameError):
                        _report_skip(report, timestamp, str(outputs), outputs.cause)
                    else:
                        for topic, data in outputs:
                            out.write(topic, timestamp, data)
                        report.segmented += 1
                    report.frames += 1
                    writing = None
                    bar.update()
        except KeyboardInterrupt:  # keep what is done: the Writer closes the bag normally
            report.interrupted = True
            report.stop_signal = (stop.received or signal.SIGINT).name
        except Exception as error:  # reading or writing the bags: stop, keep what is done
            report.error = f"{type(error).__name__}: {error}"
            if writing is not None:
                report.error += (
                    f" (while writing the frame at {writing} ns: part of its messages may be in "
                    "the bag; the per-topic counts are exact)"
                )
            logger.debug("the run stopped on an error", exc_info=True)
    report.written = out.counts
    return report


def _frame_outputs(
    job: BagJob,
    segmenter: Segmenter,
    drawing: tuple[float, bool],
    max_pixels: int,
    raw: bytes | memoryview,
) -> list[tuple[str, bytes]] | FrameError:
    """One input frame's output messages, serialized, in the node's order; or why it is skipped."""
    try:
        header, rgb = decode_frame(raw, job.image_type, max_pixels)
    except FrameError as error:
        return error
    try:
        segmentation = segmenter.segment(rgb)
        # label_info first, as the node does: whoever has the labels can decode them.
        threshold = segmenter.config.score_threshold
        outputs = [
            (job.outputs.label_info, label_info(header, segmentation.class_names, threshold))
        ]
        labels = segmentation.labels
        to_image = mono16_to_image if labels.dtype == np.uint16 else mono8_to_image
        outputs.append((job.outputs.labels, to_image(labels, header)))
        for index, name in enumerate(segmentation.class_names):
            if name in job.outputs.masks:
                mask = segmentation.mask(index).astype(np.uint8) * np.uint8(255)
                outputs.append((job.outputs.masks[name], mono8_to_image(mask, header)))
        if job.outputs.overlay is not None:
            from ovss_ros.core.drawing import overlay  # its palette costs 0.25 s: not at start-up

            alpha, legend = drawing
            blended = overlay(rgb, segmentation, alpha, legend=legend)
            outputs.append((job.outputs.overlay, rgb8_to_image(blended, header)))
        return [(topic, serialize_message(message)) for topic, message in outputs]
    except Exception as error:  # e.g. out of memory: this frame fails, the next may not
        return FrameError(f"{type(error).__name__}: {error}", FAILED)


def _report_skip(report: BagReport, timestamp: int, reason: str, cause: str) -> None:
    report.skipped.append(SkippedFrame(timestamp, reason, cause))
    if len(report.skipped) <= MAX_REPORTED_SKIPS:
        logger.warning("skipping frame at %d ns (%s): %s", timestamp, cause, reason)
    if len(report.skipped) == MAX_REPORTED_SKIPS:
        logger.warning("further skipped frames are only counted")
