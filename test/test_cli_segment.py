"""ovss-segment end to end on the real VOC samples with a tiny random model."""

import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_VIT, voc_image_paths

from ovss_ros.cli.engine_args import config_from_args
from ovss_ros.cli.segment import main, parse_args
from ovss_ros.core import Segmentation, Segmenter
from ovss_ros.core import overlay as draw_overlay

CLASS_NAMES = ["person", "tv", "dog"]

ENGINE = [
    "--model",
    str(TINY_VIT),
    "--pretrained",
    "none",
    "--short-side",
    "64",
    "--templates",
    "single",
]


def test_folder_in_labels_and_overlays_out(tmp_path):
    folder = voc_image_paths()[0].parent
    out = tmp_path / "out"
    assert (
        main([str(folder), "--classes", "person", "tv; monitor", "dog", "-o", str(out)] + ENGINE)
        == 0
    )
    assert (out / "labels.txt").read_text() == "0 person\n1 tv\n2 dog\n"
    for path in voc_image_paths():
        labels = cv2.imread(str(out / f"{path.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(path))
        assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
        assert set(np.unique(labels)) <= {0, 1, 2}
        overlay = cv2.imread(str(out / f"{path.stem}_overlay.jpg"))
        assert overlay.shape == image.shape
        # The node's colours and legend (up to JPEG's loss): the drawing is the same code.
        segmentation = Segmentation(labels, np.ones(labels.shape, np.float32), CLASS_NAMES)
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        expected = draw_overlay(rgb, segmentation, 0.5)[:, :, ::-1].astype(np.float64)
        plain = draw_overlay(rgb, segmentation, 0.5, legend=False)[:, :, ::-1]
        legend = (expected != plain).any(axis=-1)
        assert legend.any()
        error = np.abs(overlay - expected)
        assert error.mean() < 2.0 and error[legend].mean() < 8.0
        assert np.abs(overlay - plain.astype(np.float64))[legend].mean() > 25.0


def test_sliding_window_method_and_no_overlay(tmp_path):
    image = voc_image_paths()[1]
    args = [
        str(image),
        "--classes",
        "cat",
        "dog",
        "--no-overlay",
        "-o",
        str(tmp_path),
        "--dense-crop",
        "32",
    ]
    args += ["--method", "sclip", "--score-threshold", "1.0"] + ENGINE
    torch.manual_seed(0)  # the random tiny model's weights, again for the reference below
    assert main(args) == 0
    labels = cv2.imread(str(tmp_path / f"{image.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    assert not list(tmp_path.glob("*_overlay.jpg"))
    # The flags reached the engine: the labels are the same engine's, sliding windows of 32 and
    # threshold 1.0 (only a probability that rounds to exactly 1.0 keeps its label).
    torch.manual_seed(0)
    reference = Segmenter(config_from_args(parse_args(args)))
    assert (reference.config.dense.crop, reference.config.method) == (32, "sclip")
    reference.set_classes(["cat", "dog"])
    expected = reference.segment(cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB))
    np.testing.assert_array_equal(labels, expected.labels)
    assert (expected.confidence[expected.labels != 255] == 1.0).all()
    assert (labels == 255).mean() > 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/image.jpg", "--classes", "cat"], "does not exist"),
        (["IMAGE", "--classes", "cat", "cat"], "duplicate class"),
        (["IMAGE", "--classes", "cat", "--model", "ViT-Q-1"], "unknown model"),
        (
            ["IMAGE", "--classes", "cat", "--dense-crop", "32", "--dense-stride", "64"],
            "dense.stride 64 larger than dense.crop 32",
        ),
    ],
)
def test_bad_arguments_exit_2_with_reason(args, message, caplog):
    args = [str(voc_image_paths()[0]) if a == "IMAGE" else a for a in args]
    engine = [a for a in ENGINE] if "--model" not in args else ENGINE[2:]
    assert main(args + engine) == 2
    assert message in caplog.text


def test_unreadable_image_is_skipped_and_reported(tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(voc_image_paths()[0], folder / "good.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main([str(folder), "--classes", "cat", "-o", str(out)] + ENGINE) == 1
    assert (out / "good_labels.png").exists() and not (out / "broken_labels.png").exists()
    assert "broken.png: not a readable image" in caplog.text


@pytest.mark.parametrize(
    "flags",
    [
        ["--refinement", "dslo", "--dslo-mode", "ot", "--dslo-affinity", "mean"]
        + ["--dense-upsample", "jbu"],
        ["--refinement", "freecp", "--dense-pamr", "--freecp-redundancy", "0.05"],
    ],
    ids=["dslo", "freecp"],
)
def test_refinement_flags(tmp_path, flags):
    image = voc_image_paths()[0]
    args = [str(image), "--classes", "cat", "dog", "--no-overlay", "-o", str(tmp_path)]
    assert main(args + flags + ENGINE) == 0
    labels = cv2.imread(str(tmp_path / f"{image.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == cv2.imread(str(image)).shape[:2]
    assert set(np.unique(labels)) <= {0, 1}
