"""Class colours and the overlay image that RViz and rqt_image_view show."""

from __future__ import annotations

import colorsys
import hashlib

import numpy as np

from ovss_ros.core.segmentation import Segmentation


def class_color(name: str) -> tuple[int, int, int]:
    """A vivid RGB colour that depends only on the class name, so it is stable across restarts
    and vocabulary changes (a hash, not Python's salted ``hash``)."""
    digest = hashlib.sha1(name.encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536.0
    saturation = 0.65 + 0.35 * digest[2] / 255.0
    value = 0.75 + 0.25 * digest[3] / 255.0
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def palette(class_names: list[str]) -> np.ndarray:
    """(len(class_names), 3) uint8 colours, index = label value."""
    return np.array([class_color(n) for n in class_names], dtype=np.uint8).reshape(-1, 3)


def overlay(rgb: np.ndarray, segmentation: Segmentation, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours into the image; unlabeled pixels keep the image as it is."""
    labels = segmentation.labels
    labelled = labels != segmentation.unlabeled
    colours = palette(segmentation.class_names)
    out = rgb.copy()
    blend = (1 - alpha) * rgb[labelled] + alpha * colours[labels[labelled].astype(np.intp)]
    out[labelled] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out
