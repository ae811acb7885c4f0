"""A ``~/segment`` request on its way (``vocabulary_services``): its job, its slow half (the
image decoded, the words' method copy prepared: ``prepare_job``, on a thread beside the frames),
the answer, and the service's counters."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ovss_interfaces.srv import Segment
from ovss_ros.core import ClassEntry, Stopped
from ovss_ros.ros.image_conversion import float32_to_image, mono8_to_image, mono16_to_image
from ovss_ros.ros.label_info import label_info
from ovss_ros.ros.log_text import one_line
from ovss_ros.ros.processing import to_rgb8
from ovss_ros.ros.request_guard import refusal
from ovss_ros.ros.service_requests import pixel_counts

if TYPE_CHECKING:
    from rclpy.task import Future

    from ovss_ros.core.segmenter import Segmenter

SUPERSEDED_TRIES = 3  # a ~/segment encoding stopped by a superseded change: tried again
UNCONFIGURED = (
    "the node is not configured (no model loaded): configure it first, or set the "
    "classes parameter, which the next configure loads"
)


@dataclass
class SegmentCounters:
    """``~/segment`` requests so far, by outcome (diagnostics)."""

    received: int = 0
    succeeded: int = 0
    refused: int = 0
    failed: int = 0
    last_seconds: float | None = None  # the last request's time on the worker
    last_failure: float = float("-inf")  # time.monotonic() of the last failed request


@dataclass(eq=False)
class SegmentJob:
    """An accepted ``~/segment`` request: its image, its words (parsed) and the Future the
    worker answers it with."""

    image: Any  # sensor_msgs Image or CompressedImage
    classes: list[ClassEntry]
    future: Future
    header: Any = None
    queued: float = field(default_factory=time.monotonic)
    # Set by the preparing thread: the image and the method copy for the words, with the
    # Segmenter's generation it was prepared at; or the answer already (a refusal), or the error.
    rgb: Any = None
    method: Any = None
    generation: int = -1
    answer: Any = None
    error: BaseException | None = None
    tries: int = 0  # preparations begun


def prepare_job(
    job: SegmentJob,
    segmenter: Segmenter | None,
    settings: Any,
    stop: threading.Event,
    counters: SegmentCounters,
) -> None:
    """Decode ``job``'s image and prepare the method copy for its words (the slow part, on a
    thread beside the frames), setting ``job``'s rgb, method and generation, or its answer (a
    refusal, counted in ``counters``). ``settings``: the node's in force (``max_input_pixels``),
    or None (unconfigured). Raises Stopped (``stop`` set), RuntimeError (stopped by
    SUPERSEDED_TRIES changes made meanwhile) or what the encoding raises."""
    from ovss_ros.core.word_segmentation import prepare_words  # torch: loaded already

    if settings is None or segmenter is None:
        job.answer = refusal(Segment, Segment.Request(), UNCONFIGURED)
        return
    if job.rgb is None:
        try:
            job.rgb = to_rgb8(job.image, settings.max_input_pixels)
        except ValueError as error:  # ImageConversionError, ImageTooLarge: its fault
            counters.refused += 1
            job.answer = refusal(Segment, Segment.Request(), one_line(str(error)))
            return
    while job.tries < SUPERSEDED_TRIES:
        job.tries += 1
        generation = segmenter.generation
        try:
            job.method = prepare_words(segmenter, job.classes)
            job.generation = generation
            return
        except Stopped:
            if stop.is_set():
                raise
        except Exception:
            if segmenter.generation == generation:
                raise
            # A change put in force meanwhile (e.g. new templates) changed the text cache
            # under this encoding: encoded again for the state in force now.
    raise RuntimeError(
        f"the words' encoding was stopped by {SUPERSEDED_TRIES} vocabulary changes "
        "made meanwhile: try again"
    )


def failed_answer(counters: SegmentCounters, error: BaseException) -> Segment.Response:
    """The answer to a request that failed with ``error`` (its own failure), counted."""
    counters.failed += 1
    counters.last_failure = time.monotonic()
    return refusal(Segment, Segment.Request(), f"segmenting failed: {error}")


def segment_response(segmentation: Any, header: Any, threshold: float) -> Segment.Response:
    """A successful Segment answer for ``segmentation`` (``core.Segmentation``) with
    ``header`` (the request image's): labels (mono8/mono16), confidence (32FC1), LabelInfo and
    the pixels per class."""
    labels = segmentation.labels
    to_image = mono16_to_image if labels.dtype.itemsize == 2 else mono8_to_image
    counts, unlabeled = pixel_counts(labels, len(segmentation.class_names))
    return Segment.Response(
        success=True,
        labels=to_image(labels, header),
        confidence=float32_to_image(segmentation.confidence, header),
        label_info=label_info(header, segmentation.class_names, threshold),
        pixel_counts=counts,
        unlabeled_pixels=unlabeled,
    )
