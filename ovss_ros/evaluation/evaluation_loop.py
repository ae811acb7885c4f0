"""The evaluation loop: segment every image of a data set and score it against its labels."""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from tqdm import tqdm

from ovss_ros.core.segmentation import Segmentation
from ovss_ros.evaluation.confusion_metrics import ConfusionMatrix
from ovss_ros.evaluation.dataset_readers import DataError, DatasetReader
from ovss_ros.ros.image_conversion import (
    DEFAULT_MAX_INPUT_PIXELS,
    ImageConversionError,
    image_file_size,
)


class ImageSegmenter(Protocol):
    """What the loop needs from the engine (``Segmenter`` has it; tests pass fakes).

    A segmenter may also have ``segment_file(rgb, image_path)`` (used instead of ``segment``:
    e.g. PnP-OVSS prompted with the image's listed classes) and ``observe(truth)`` (called after
    each image is scored: a second scoring, e.g. the PnP-OVSS release's).
    """

    def segment(self, rgb: np.ndarray) -> Segmentation: ...


def dataset_labels(
    segmentation: Segmentation, has_background: bool, num_labels: int
) -> np.ndarray:
    """Engine labels -> data-set labels for scoring.

    With a background class (label 0) the engine's classes are shifted by one and its unlabeled
    pixels are background; without one, unlabeled pixels get ``num_labels`` ("no prediction").
    """
    engine = segmentation.labels
    unlabeled = engine == segmentation.unlabeled
    labels = engine.astype(np.int64)
    if has_background:
        labels += 1
        labels[unlabeled] = 0
    else:
        labels[unlabeled] = num_labels
    return labels


def read_rgb(path: Path, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB, decoded with OpenCV as mmsegmentation does (same JPEG decoder).

    Bounded first, as every image the tools read (``image_file_size``): a regular file whose
    header declares at most ``max_pixels`` pixels. Raises DataError naming the file for any
    unusable image (not a regular file, too large, no image, undecodable).
    """
    try:
        image_file_size(path, max_pixels=max_pixels)
    except (ImageConversionError, OSError) as error:
        raise DataError(f"image {path}: {one_line(error)}") from None
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"image {path} cannot be decoded (damaged or truncated)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def one_line(error: object) -> str:
    return " ".join(str(error).split())


@dataclass
class EvaluationResult:
    """Scores of one run, with what is needed to report them."""

    dataset: str
    label_names: list[str]
    confusion: ConfusionMatrix
    images: int
    segment_seconds: float  # engine time only (no file reading or scoring)
    total_seconds: float

    def summary(self) -> dict[str, float]:
        """mIoU, mAcc, aAcc in percent (NaN when nothing was scored)."""
        return self.confusion.summary()

    def per_class(self) -> list[dict[str, object]]:
        """One row per label: name, IoU and Acc in percent (None when undefined), GT pixels."""
        return [
            {"name": name, "iou": _finite(100 * iou), "acc": _finite(100 * acc), "pixels": int(n)}
            for name, iou, acc, n in zip(
                self.label_names,
                self.confusion.iou(),
                self.confusion.class_accuracy(),
                self.confusion.true_pixels,
                strict=True,
            )
        ]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: NaN becomes None so that the file stays standard JSON."""
        rate = self.images / self.segment_seconds if self.segment_seconds else None
        return {
            "dataset": self.dataset,
            "images": self.images,
            **{key: _finite(value) for key, value in self.summary().items()},
            "segment_seconds": self.segment_seconds,
            "total_seconds": self.total_seconds,
            "images_per_second": rate,
            "per_class": self.per_class(),
        }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def evaluate(
    segmenter: ImageSegmenter,
    reader: DatasetReader,
    label_names: list[str],
    has_background: bool,
    limit: int | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
) -> EvaluationResult:
    """Segment the first ``limit`` images (all when None) and accumulate one confusion matrix.

    The segmenter must already hold the data set's vocabulary (``set_classes``) and settings.
    The next image is decoded in a worker thread while the current one is segmented, so file
    reading does not idle the GPU. Images and labels are bounded by ``max_pixels`` before
    they are decoded; an unusable one raises DataError naming it (the run stops: a skipped
    image would change the score).
    """
    reader.max_pixels = max_pixels
    count = len(reader) if limit is None else max(0, min(limit, len(reader)))
    confusion = ConfusionMatrix(len(label_names))

    def load(index: int) -> tuple[Path, np.ndarray, np.ndarray]:
        image_path, truth = reader.sample(index)
        return image_path, read_rgb(image_path, max_pixels), truth

    segment_seconds, start = 0.0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = pool.submit(load, 0) if count else None
        for index in tqdm(range(count), desc=reader.name, unit="img", disable=not progress):
            image_path, rgb, truth = pending.result()
            pending = pool.submit(load, index + 1) if index + 1 < count else None
            if rgb.shape[:2] != truth.shape:
                raise DataError(
                    f"{image_path}: image {rgb.shape[:2]} and labels {truth.shape} differ in size"
                )
            tick = time.perf_counter()
            by_file = getattr(segmenter, "segment_file", None)  # e.g. per-image class lists
            segmentation = segmenter.segment(rgb) if by_file is None else by_file(rgb, image_path)
            segment_seconds += time.perf_counter() - tick
            confusion.update(truth, dataset_labels(segmentation, has_background, len(label_names)))
            observe = getattr(segmenter, "observe", None)  # a second scoring of the same image
            if observe is not None:
                observe(truth)
    return EvaluationResult(
        dataset=reader.name,
        label_names=list(label_names),
        confusion=confusion,
        images=count,
        segment_seconds=segment_seconds,
        total_seconds=time.perf_counter() - start,
    )
