"""FreeCP in the segmenter: the official output assembly over windows, frames where nothing
survives (the robot's unlabeled pixels and ovss-eval's official scoring), the defaults."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_VIT
from freecp_reference import official_labels

from ovss_ros.cli.evaluate import EmptyAsFirstClass, protocol_segmenter
from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.evaluation.protocol import METHOD_PROTOCOLS

CONFIG_YAML = Path(__file__).resolve().parents[1] / "config" / "ovss.yaml"
CLASSES = ["person", "tv; television; monitor", "dog", "cat | a small furry pet", "chair"]


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig.from_flat(
        {
            "model": str(TINY_VIT),
            "pretrained": "none",
            "device": "cpu",
            "short_side": 64,
            "templates": "single",
            "refinement": "freecp",
            "dense.crop": 48,
            "dense.stride": 16,
            "freecp.redundancy": 0.1,
        }
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(CLASSES)
    return segmenter


@pytest.fixture()
def fresh(segmenter):
    base = segmenter.config.flat()
    yield segmenter
    segmenter.reconfigure(base)


def official_assembly(segmenter: Segmenter, rgb: np.ndarray) -> torch.Tensor:
    """FreeCP's ``forward_slide``: each window's scores (0 for dropped classes) upsampled to
    the window (bilinear), summed into the resized image and divided by the window count, then
    bilinear to the input size: (K, H, W)."""
    encoded = segmenter.method.encode(segmenter.method.preprocess(rgb))
    _, scores = segmenter.method.head(encoded)
    preds = torch.zeros(scores.shape[1], *encoded.size)
    count = torch.zeros(1, *encoded.size)
    for (top, left, height, width), window in zip(encoded.boxes, scores, strict=True):
        up = F.interpolate(window[None], size=(height, width), mode="bilinear")[0]
        preds += F.pad(
            up, (left, encoded.size[1] - left - width, top, encoded.size[0] - top - height)
        )
        count[:, top : top + height, left : left + width] += 1
    preds = preds / count
    return F.interpolate(preds[None], size=rgb.shape[:2], mode="bilinear")[0]


@pytest.mark.parametrize("image", [0, 1])
def test_background_is_one_minus_the_max_after_the_windows_are_averaged(fresh, voc_rgb, image):
    fresh.reconfigure(background_words=("sky", "wall"))
    rgb = voc_rgb[image]
    encoded = fresh.method.encode(fresh.method.preprocess(rgb))
    assert len(encoded.boxes) > 1, "the frame must be cut into overlapping windows"
    _, scores = fresh.method.head(encoded)
    assert scores.shape[1] == len(CLASSES)  # no background channel per window
    dropped = (scores == 0).flatten(2).all(dim=2)
    assert (dropped | (scores.amax(dim=(2, 3)) > 0.99)).all()  # kept maps reach 1 (min-max)
    assert dropped.any() and not dropped.all()
    want = official_labels(official_assembly(fresh, rgb), background=True).numpy()
    got = fresh.segment(rgb).labels.astype(np.int64)
    got = np.where(got == 255, 0, got + 1)  # unlabeled is FreeCP's background (label 0)
    assert (want == 0).any() and (want > 0).any(), "both background and classes must appear"
    np.testing.assert_array_equal(got, want)


def test_without_background_the_labels_are_the_argmax_of_the_averaged_scores(fresh, voc_rgb):
    rgb = voc_rgb[0]
    averaged = official_assembly(fresh, rgb)
    want = official_labels(averaged, background=False).numpy()
    got = fresh.segment(rgb).labels
    assert (averaged.amax(dim=0) > 0).all()  # some class survives over every pixel here
    np.testing.assert_array_equal(got, want)


def test_nothing_survives_is_unlabeled_for_the_robot_and_first_class_in_the_protocol(
    fresh, voc_rgb
):
    """FreeCP's redundancy scores are at most 0.5: a threshold of 0.5 drops every class in
    every window. The official code then labels every pixel with its first class (argmax of
    zeros); the robot gets an honest all-unlabeled frame; ovss-eval's FreeCP protocol scores
    it as the official does on data sets without background, and leaves it alone otherwise."""
    fresh.reconfigure({"freecp.redundancy": 0.5})
    rgb = voc_rgb[1]
    assert (official_assembly(fresh, rgb) == 0).all()
    segmentation = fresh.segment(rgb)
    assert (segmentation.labels == segmentation.unlabeled).all()
    freecp = METHOD_PROTOCOLS["freecp"]
    scored = protocol_segmenter(fresh, freecp, has_background=False)
    assert isinstance(scored, EmptyAsFirstClass)
    assert (scored.segment(rgb).labels == 0).all()
    assert protocol_segmenter(fresh, freecp, has_background=True) is fresh
    assert protocol_segmenter(fresh, METHOD_PROTOCOLS["sclip"], has_background=False) is fresh
    fresh.reconfigure(score_threshold=0.2)  # unlabeled could then mean a low probability
    assert protocol_segmenter(fresh, freecp, has_background=False) is fresh
    fresh.reconfigure(background_words=("sky",), score_threshold=0.0)
    segmentation = fresh.segment(rgb)  # with background words: FreeCP's background wins
    assert (segmentation.labels == segmentation.unlabeled).all()


def test_defaults_are_the_official_class_defaults():
    """FreeCPSegmentation(rp_thres=0.15, ap_thres=0.7); the node's YAML restates them."""
    config = EngineConfig()
    assert (config.freecp.redundancy, config.freecp.ambiguity) == (0.15, 0.7)
    parameters = yaml.safe_load(CONFIG_YAML.read_text())["/**"]["ros__parameters"]
    assert parameters["freecp"]["redundancy"] == config.freecp.redundancy
    assert parameters["freecp"]["ambiguity"] == config.freecp.ambiguity
