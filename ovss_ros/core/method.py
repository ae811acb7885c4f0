"""The method registry: which family each ``method`` name belongs to.

The dense family (``methods/dense``: ``DenseMethod``) runs the last-block modes, NACLIP,
SCLIP, ClearCLIP, MaskCLIP (and its reduced form), vanilla CLIP and FreeCP's variants; PnP-OVSS
(``methods/pnp_ovss``), DeOP and the two-stream baseline (``methods/deop``) each bring their own
pipeline (``method_pipelines.Pipeline``). Every family offers the Segmenter the same calls
(:class:`Method`); preparing a change is the family's own (``DenseMethod.prepare`` / ``commit``,
``build_pipeline``), chosen by :func:`builds_pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ovss_ros.core.config import PIPELINE_METHODS, EngineConfig
from ovss_ros.core.methods.dense.forward import LAST_BLOCK_MODES
from ovss_ros.core.segmentation import Segmentation
from ovss_ros.core.vocabulary import ClassEntry


class Method(Protocol):
    """What the Segmenter asks of the method in force (``DenseMethod``, ``Pipeline``)."""

    def segment_many(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """Segment HxWx3 uint8 RGB images (checked by the caller) with the vocabulary set."""

    def batch_groups(self, images: Sequence[np.ndarray]) -> list[list[int]]:
        """Indices of the images that share one forward pass."""

    def check(self, config: EngineConfig, classes: Sequence[ClassEntry] | None = None) -> None:
        """Checks of ``config`` (and ``classes``) against what this method has loaded, where
        ``config`` would keep it; ValueError / VocabularyError."""

    def describe(self) -> tuple[str, bool]:
        """(what runs, in words; whether it deserves a warning), for logs."""

    def release(self) -> None:
        """Free what only this method holds (e.g. DSLO's Stable Diffusion model)."""


FAMILIES: dict[str, str] = {
    **{name: "dense" for name in LAST_BLOCK_MODES},
    **{name: name if name != "twostream" else "deop" for name in PIPELINE_METHODS},
}


def family(method: str) -> str:
    """The family folder under ``core/methods`` that runs ``method``; KeyError if unknown."""
    return FAMILIES[method]


def builds_pipeline(method: str) -> bool:
    """Whether ``method`` runs as a ``Pipeline`` (pnp_ovss, deop, twostream), not the dense
    family's ``DenseMethod``."""
    return family(method) != "dense"
