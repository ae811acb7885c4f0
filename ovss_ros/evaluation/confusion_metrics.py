"""Pixel confusion matrix and the segmentation scores derived from it (IoU, mIoU, aAcc, mAcc).

The definitions are mmsegmentation's ``IoUMetric``, which the published numbers use: pixels are
summed over the whole data set before dividing (not averaged per image), and a class whose IoU is
undefined (never in the ground truth and never predicted) is left out of the mean. A class that is
predicted but never present scores IoU 0 and does count.

``split_summary`` adds the zero-shot scores (mIoU of the seen and of the unseen classes, hIoU)
as DeOP's evaluator computes them (``ovss_ros.evaluation.class_splits``).

One extra column, "no prediction", holds scored pixels the engine left unlabeled on a data set
without a background class (possible only with a threshold or background words there): they are
misses for their true class but false positives for none.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

from ovss_ros.evaluation.dataset_readers import IGNORE


class ConfusionMatrix:
    """Counts[t, p] = pixels of true class t predicted as p (p = num_classes: no prediction)."""

    def __init__(self, num_classes: int) -> None:
        if not 0 < num_classes < IGNORE:
            raise ValueError(f"num_classes must be in 1..{IGNORE - 1}, got {num_classes}")
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    @property
    def no_prediction(self) -> int:
        """The prediction value that means "left unlabeled" (the extra column)."""
        return self.num_classes

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        """Add one image: ``truth`` in 0..n-1 or 255 (ignored), ``prediction`` in 0..n."""
        if truth.shape != prediction.shape:
            raise ValueError(f"shapes differ: truth {truth.shape}, prediction {prediction.shape}")
        scored = truth != IGNORE
        true = truth[scored].astype(np.int64)
        predicted = prediction[scored].astype(np.int64)
        if true.size and true.max() >= self.num_classes:
            bad = np.unique(true[true >= self.num_classes])[:10].tolist()
            raise ValueError(
                f"ground truth has values {bad} outside 0..{self.num_classes - 1} and 255: "
                "wrong data set or label files (Cityscapes needs *_labelTrainIds.png)?"
            )
        if predicted.size and (predicted.min() < 0 or predicted.max() > self.no_prediction):
            raise ValueError(f"prediction values outside 0..{self.no_prediction}")
        width = self.num_classes + 1
        self.counts += np.bincount(
            true * width + predicted, minlength=self.num_classes * width
        ).reshape(self.num_classes, width)

    @property
    def true_pixels(self) -> np.ndarray:
        """Scored pixels per true class."""
        return self.counts.sum(axis=1)

    @property
    def predicted_pixels(self) -> np.ndarray:
        """Scored pixels predicted as each class (the no-prediction column excluded)."""
        return self.counts[:, : self.num_classes].sum(axis=0)

    @property
    def correct_pixels(self) -> np.ndarray:
        return np.diagonal(self.counts).copy()

    def iou(self) -> np.ndarray:
        """Per-class intersection over union; NaN where the class is neither true nor predicted."""
        union = self.true_pixels + self.predicted_pixels - self.correct_pixels
        return _divide(self.correct_pixels, union)

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall (mmsegmentation's "Acc"); NaN where the class is never true."""
        return _divide(self.correct_pixels, self.true_pixels)

    def pixel_accuracy(self) -> float:
        """aAcc: correct pixels / scored pixels; NaN before any pixel was scored."""
        total = self.counts.sum()
        return float(self.correct_pixels.sum() / total) if total else float("nan")

    def summary(self) -> dict[str, float]:
        """mIoU, mAcc and aAcc in percent, as the papers report them."""
        return {
            "mIoU": 100 * _nanmean(self.iou()),
            "mAcc": 100 * _nanmean(self.class_accuracy()),
            "aAcc": 100 * self.pixel_accuracy(),
        }

    def split_summary(self, unseen: Collection[int]) -> dict[str, float]:
        """mIoU over all classes, the seen ones (all but ``unseen``) and the ``unseen`` label
        values, and hIoU, the harmonic mean of the seen and unseen mIoU, in percent.

        As DeOP's ``GeneralizedSemSegEvaluator.evaluate`` computes "mIoU", "mIoU-base",
        "mIoU-unbase" and "hIoU-base" (github.com/CongHan0808/DeOP,
        ``mask_former/evaluation/generalized_sem_seg_evaluation.py``): each mean is over the
        classes of its set that are true or predicted somewhere (a class predicted but never
        true scores 0 and counts, one neither true nor predicted is left out), a set without such
        a class has mean NaN, and hIoU = 2 / (1/seen + 1/unseen): 0 when either is 0, NaN when
        either is NaN. Raises ValueError for a label value outside 0..num_classes-1.
        """
        bad = sorted(label for label in unseen if not 0 <= label < self.num_classes)
        if bad:
            raise ValueError(f"unseen labels {bad} outside 0..{self.num_classes - 1}")
        iou = self.iou()
        is_unseen = np.zeros(self.num_classes, dtype=bool)
        is_unseen[list(unseen)] = True
        seen, unseen_mean = _nanmean(iou[~is_unseen]), _nanmean(iou[is_unseen])
        return {
            "mIoU": 100 * _nanmean(iou),
            "mIoU_seen": 100 * seen,
            "mIoU_unseen": 100 * unseen_mean,
            "hIoU": 100 * harmonic_mean(seen, unseen_mean),
        }


def harmonic_mean(a: float, b: float) -> float:
    """2 / (1/a + 1/b) as DeOP's evaluator computes it in numpy: 0 when either is 0 (1/0 is
    inf), NaN when either is NaN (``statistics.harmonic_mean`` gives 0 for NaN and 0)."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return 0.0 if a == 0 or b == 0 else 2 * a * b / (a + b)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    result = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")
