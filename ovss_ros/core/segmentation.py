"""The result of segmenting one frame, in the form every consumer (node, CLI, evaluator) needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNLABELED_8 = 255
UNLABELED_16 = 65535
MAX_8BIT_CLASSES = 254  # labels 0..253 fit in mono8 next to 255 = unlabeled


def label_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """mono8 while the vocabulary fits, mono16 beyond 254 classes."""
    return np.uint8 if num_classes <= MAX_8BIT_CLASSES else np.uint16


@dataclass
class Segmentation:
    """Labels and confidence of one frame, with the vocabulary that produced them."""

    labels: np.ndarray  # HxW uint8 (255 = unlabeled) or uint16 (65535 = unlabeled)
    confidence: np.ndarray  # HxW float32, probability of the best class
    class_names: list[str]  # label value -> class name, for this frame

    @property
    def unlabeled(self) -> int:
        return UNLABELED_8 if self.labels.dtype == np.uint8 else UNLABELED_16

    def mask(self, index: int) -> np.ndarray:
        """HxW bool mask of class ``index``."""
        return self.labels == index


def check_rgb(rgb: np.ndarray) -> tuple[int, int]:
    """(H, W) of an HxWx3 uint8 RGB array; ValueError otherwise (also for an empty image)."""
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.ndim != 3
        or rgb.shape[2] != 3
        or rgb.dtype != np.uint8
    ):
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {type(rgb).__name__} {shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"empty image {rgb.shape}")
    return rgb.shape[0], rgb.shape[1]
