"""What the worker thread does with the frames it takes: convert, segment together, publish.

The newest frame of every camera that has one is converted on its own (too old, unreadable or
too large: counted and skipped), the usable ones are segmented in one ``segment_many`` call (one
forward pass for frames of one size), and each result is published to its camera's outputs with
its frame's header. Every frame gets exactly one outcome (``frames.FrameLedger``), each in its own
error boundary: one bad frame never costs another its output, a batch that fails (out of GPU
memory) is retried frame by frame, and an error nobody expected costs only the frames it left
without an outcome (counted as failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from rclpy.clock import Clock
from sensor_msgs.msg import CompressedImage, Image

from ovss_ros.core import Segmentation, Stopped
from ovss_ros.ros.frames import Frame, FrameLedger, frame_age, stamp_problem
from ovss_ros.ros.image_conversion import ImageConversionError, compressed_to_rgb8, image_to_rgb8
from ovss_ros.ros.log_text import KindThrottle, describe, one_line
from ovss_ros.ros.parameters import Settings

if TYPE_CHECKING:
    from ovss_ros.core.segmenter import Segmenter

LOG_THROTTLE_S = 5.0

# One frame ready to publish: (frame, its RGB pixels, its segmentation, inference seconds).
Result = tuple[Frame, np.ndarray, Segmentation, float]


def to_rgb8(message: Image | CompressedImage, max_pixels: int) -> np.ndarray:
    """The frame as HxWx3 uint8 RGB; raises ImageConversionError, and its ImageTooLarge for a
    frame of more than ``max_pixels`` pixels, refused from its declared size (width x height,
    or the compressed data's header) before anything is decoded or converted."""
    if isinstance(message, CompressedImage):
        return compressed_to_rgb8(message, max_pixels=max_pixels)
    return image_to_rgb8(message, max_pixels=max_pixels)


class FrameProcessor:
    """The worker's frame handling for one node; the node's state comes in through callables
    (read on the worker thread each time: the node swaps its Segmenter and settings)."""

    def __init__(
        self,
        ledger: FrameLedger,
        logger: Callable[[], Any],
        clock: Callable[[], Clock],
        running: Callable[[], bool],
        segmenter: Callable[[], Segmenter | None],
        settings: Callable[[], Settings | None],
        on_error: Callable[[BaseException], None],
        after_publish: Callable[[Frame, Segmentation], None] | None = None,
    ) -> None:
        self._ledger = ledger
        self._after_publish = after_publish  # more outputs of a published frame (3D: never raises)
        self._logger = logger
        self._clock = clock
        self._running = running
        self._segmenter = segmenter
        self._settings = settings
        self._on_worker_error = on_error
        self._warnings = KindThrottle(LOG_THROTTLE_S)

    def process(self, frames: list[Frame]) -> None:
        """Convert, segment together and publish the newest frame of each camera that has one.

        Every frame gets exactly one outcome: what cannot be used is counted and skipped on its
        own, and an error nobody expected costs only the frames it left without an outcome
        (counted as failed), never another frame's output.
        """
        try:
            self._process_frames(frames)
        except Stopped:  # the node is stopping: what was not published is dropped, quietly
            for frame in frames:
                self._ledger.settle(frame, "dropped_paused")
            raise
        finally:
            for frame in frames:
                if self._ledger.settle(frame, "failed"):
                    self._logger().error(
                        f"a frame from {frame.camera.name} was lost to an unexpected error",
                        throttle_duration_sec=LOG_THROTTLE_S,
                    )

    def _process_frames(self, frames: list[Frame]) -> None:
        settings = self._settings()
        if not self._running() or settings is None:
            for frame in frames:
                self._ledger.settle(frame, "dropped_paused")
            return
        batch = []
        for frame in frames:
            try:
                rgb = self._convert(frame, settings)
            except Exception as error:
                self._fail(frame, "while converting", error)
                continue
            if rgb is not None:
                batch.append((frame, rgb))
        cameras = {id(frame.camera): frame.camera for frame, _ in batch}.values()
        for camera in cameras:  # diagnostics: a slow model is busy, not stuck
            camera.stats.start_segmenting()
        try:
            results = self._segment(batch)
        finally:
            for camera in cameras:
                camera.stats.stop_segmenting()
        for frame, rgb, segmentation, inference_s in results:
            if not self._running() or not self._ledger.claim(frame):
                self._ledger.settle(frame, "dropped_paused")  # paused or deactivated meanwhile
                continue
            try:
                header = frame.message.header
                frame.camera.frame_id = header.frame_id
                frame.camera.publish(
                    rgb, segmentation, header, settings, self._segmenter().config.score_threshold
                )
                if self._after_publish is not None:
                    self._after_publish(frame, segmentation)
            except Exception as error:
                self._fail(frame, "while publishing", error)
            else:
                age = frame_age(header, self._clock()) if frame.age_known else None
                self._ledger.settle(frame, "processed", inference_s, age)

    def _fail(self, frame: Frame, stage: str, error: Exception) -> None:
        if self._ledger.settle(frame, "failed"):
            self._logger().error(
                f"a frame from {frame.camera.name} failed {stage} "
                f"({frame.camera.stats.totals.failed} failed so far): "
                f"{describe(error)}",
                throttle_duration_sec=LOG_THROTTLE_S,
            )

    def _convert(self, frame: Frame, settings: Settings) -> np.ndarray | None:
        """The frame as RGB, or None (its outcome given) if it is stale or cannot be read."""
        message, stats = frame.message, frame.camera.stats
        problem = stamp_problem(message.header.stamp, self._clock())
        if problem is not None:
            frame.age_known = False
            stats.count("unusable_stamp")
            self._warn_once_in_a_while(
                ("stamp", frame.camera.name),
                f"frame from {frame.camera.name} has a header stamp that {problem}: its age is "
                "unknown, so it is never too old and gives no latency",
            )
        if settings.max_frame_age > 0.0 and frame.age_known:
            age = frame_age(message.header, self._clock())
            if age is not None and age > settings.max_frame_age:
                self._ledger.settle(frame, "dropped_stale")
                return None
        try:
            return to_rgb8(message, settings.max_input_pixels)
        except ImageConversionError as error:
            self._ledger.settle(frame, "rejected")
            self._warn_once_in_a_while(
                ("rejected", frame.camera.name, type(error).__name__),
                f"skipping frame from {frame.camera.name} ({stats.totals.rejected} rejected so "
                f"far): {one_line(str(error))}",
            )
            return None

    def _warn_once_in_a_while(self, kind: tuple, text: str) -> None:
        """Log a warning unless one of the same kind was logged within LOG_THROTTLE_S."""
        if self._warnings.due(kind):
            self._logger().warning(text)

    def _segment(self, batch: list[tuple[Frame, np.ndarray]]) -> list[Result]:
        """Segment the frames in one ``segment_many`` call.

        If it raises (e.g. CUDA out of memory), each frame is tried alone, so that a batch too
        large for the GPU, or one camera's frame that the model cannot take, costs only the
        frames that fail on their own: those are counted as failed, and the node goes on.
        """
        if not batch:
            return []
        start = time.perf_counter()
        try:
            segmentations = self._segmenter().segment_many([rgb for _, rgb in batch])
        except Stopped:
            raise
        except Exception as error:
            # Only the text leaves this block: the traceback holds the failed forward's tensors.
            failure = describe(error)
        else:
            inference_s = time.perf_counter() - start
            self._count_batched(batch)
            return [
                (frame, rgb, segmentation, inference_s)
                for (frame, rgb), segmentation in zip(batch, segmentations, strict=True)
            ]
        if len(batch) == 1:
            frame = batch[0][0]
            self._ledger.settle(frame, "failed")
            self._logger().error(
                f"inference failed on a frame from {frame.camera.name} "
                f"({frame.camera.stats.totals.failed} so far): {failure}",
                throttle_duration_sec=LOG_THROTTLE_S,
            )
            return []
        self._logger().warning(
            f"inference failed on a batch of {len(batch)} frames ({failure}): "
            "segmenting them one by one",
            throttle_duration_sec=LOG_THROTTLE_S,
        )
        return [result for item in batch for result in self._segment([item])]

    def _count_batched(self, batch: list[tuple[Frame, np.ndarray]]) -> None:
        """Count the frames that shared a forward pass: the engine batches equal resized sizes."""
        try:
            groups = self._segmenter().batch_groups([rgb for _, rgb in batch])
        except Stopped:
            raise
        except Exception as error:  # a statistic: never worth a frame's output
            self._on_worker_error(error)
            return
        for group in groups:
            if len(group) > 1:
                for index in group:
                    batch[index][0].camera.stats.count("batched")
