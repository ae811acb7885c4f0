"""Confusion-matrix scores: perfect on real VOC labels, hand-computed values on small examples."""

from fractions import Fraction

import numpy as np
import pytest
from conftest import VOC_DIR, voc_image_paths
from PIL import Image

from ovss_ros.core import Segmentation
from ovss_ros.evaluation import ConfusionMatrix, dataset_labels


def close(value: float, fraction: Fraction) -> bool:
    return value == pytest.approx(float(fraction), abs=1e-12)


def test_ground_truth_as_prediction_scores_100_on_real_voc():
    confusion = ConfusionMatrix(21)
    for image in voc_image_paths():
        truth = np.asarray(Image.open(VOC_DIR / "SegmentationClassPNG" / f"{image.stem}.png"))
        assert 255 in truth or image.stem == "2011_000025"  # boundaries are ignored
        confusion.update(truth, truth)
    summary = confusion.summary()
    assert summary == {"mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0}
    present = {0, 5, 6, 7, 9, 15, 18}  # classes in the three samples
    iou = confusion.iou()
    assert set(np.flatnonzero(~np.isnan(iou))) == present  # the others are left out of the mean
    assert confusion.counts.sum() == sum(
        (np.asarray(Image.open(p)) != 255).sum()
        for p in sorted((VOC_DIR / "SegmentationClassPNG").glob("*.png"))
    )


TRUTH = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 1, 1],
        [2, 2, 255, 255],
    ]
)
PREDICTION = np.array(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 2],
        [2, 0, 1, 1],
        [2, 2, 0, 0],  # the last two pixels are ignored in the truth
    ]
)


def test_hand_computed_4x4():
    confusion = ConfusionMatrix(3)
    confusion.update(TRUTH, PREDICTION)
    # rows: truth 0, 1, 2; columns: predicted 0, 1, 2, no prediction
    np.testing.assert_array_equal(confusion.counts, [[3, 1, 0, 0], [0, 5, 1, 0], [1, 0, 3, 0]])
    expected_iou = [Fraction(3, 5), Fraction(5, 7), Fraction(3, 5)]  # 3/(4+4-3), 5/(6+6-5)
    assert all(close(v, f) for v, f in zip(confusion.iou(), expected_iou, strict=True))
    expected_acc = [Fraction(3, 4), Fraction(5, 6), Fraction(3, 4)]
    assert all(close(v, f) for v, f in zip(confusion.class_accuracy(), expected_acc, strict=True))
    summary = confusion.summary()
    assert close(summary["mIoU"], 100 * Fraction(67, 105))  # (3/5 + 5/7 + 3/5) / 3
    assert close(summary["mAcc"], 100 * Fraction(7, 9))
    assert close(summary["aAcc"], 100 * Fraction(11, 14))  # 11 correct of 14 scored


def test_images_accumulate_pixels_not_per_image_means():
    confusion = ConfusionMatrix(3)
    confusion.update(TRUTH, PREDICTION)
    confusion.update(TRUTH[:1], TRUTH[:1])  # 4 more correct pixels: 2 of class 0, 2 of class 1
    assert close(confusion.iou()[0], Fraction(5, 7))  # 5 / (6 + 6 - 5)
    assert close(confusion.iou()[1], Fraction(7, 9))  # 7 / (8 + 8 - 7)
    assert close(confusion.pixel_accuracy(), Fraction(15, 18))


def test_absent_classes_are_left_out_but_false_positives_count():
    confusion = ConfusionMatrix(4)
    truth = np.array([[0, 0, 1, 1]])
    confusion.update(truth, np.array([[0, 0, 1, 2]]))  # class 2 predicted, never true
    iou = confusion.iou()
    assert close(iou[0], Fraction(1)) and close(iou[1], Fraction(1, 2)) and iou[2] == 0
    assert np.isnan(iou[3])  # class 3: neither true nor predicted
    assert close(confusion.summary()["mIoU"], 100 * Fraction(1, 2))  # (1 + 1/2 + 0) / 3
    assert np.isnan(confusion.class_accuracy()[2])


def test_no_prediction_is_a_miss_without_a_false_positive():
    confusion = ConfusionMatrix(2)
    confusion.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))  # 2 = no prediction
    assert close(confusion.iou()[0], Fraction(1, 2)) and close(confusion.iou()[1], Fraction(1))
    assert close(confusion.pixel_accuracy(), Fraction(3, 4))


def test_empty_matrix_and_bad_values():
    confusion = ConfusionMatrix(3)
    assert all(np.isnan(v) for v in confusion.summary().values())
    with pytest.raises(ValueError, match=r"values \[7\] outside 0..2"):
        confusion.update(np.array([0, 7]), np.array([0, 0]))
    with pytest.raises(ValueError, match="prediction values"):
        confusion.update(np.array([0, 1]), np.array([0, 4]))
    with pytest.raises(ValueError, match="shapes differ"):
        confusion.update(np.zeros((2, 2)), np.zeros((2, 3)))


def segmentation(labels: list[int], dtype=np.uint8) -> Segmentation:
    labels = np.array([labels], dtype=dtype)
    return Segmentation(labels, np.ones(labels.shape, np.float32), ["a", "b"])


def test_engine_labels_to_dataset_labels():
    # background data set: unlabeled -> background 0, engine class k -> k + 1
    np.testing.assert_array_equal(dataset_labels(segmentation([0, 1, 255]), True, 3), [[1, 2, 0]])
    wide = segmentation([0, 65535], np.uint16)
    np.testing.assert_array_equal(dataset_labels(wide, True, 3), [[1, 0]])
    # no background: classes as they are, unlabeled -> "no prediction" column
    np.testing.assert_array_equal(dataset_labels(segmentation([0, 1, 255]), False, 2), [[0, 1, 2]])
