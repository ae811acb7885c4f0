"""The Method interface and the registry: which family runs each ``method`` name.

The dense family (``methods/dense``: ``DenseMethod``) runs the last-block modes, NACLIP,
SCLIP, ClearCLIP, MaskCLIP (and its reduced form), vanilla CLIP and FreeCP's variants; PnP-OVSS
(``methods/pnp_ovss``), DeOP, the two-stream baseline and superpixel_clip (``methods/deop``) each
bring their own pipeline (``method_pipelines.Pipeline``). Every family offers the Segmenter the
same calls (:class:`Method`) and one ``update`` function (``FamilyUpdate``) that turns the method
in force into the one a change asks for, all or nothing; the Segmenter looks it up here by name
and never branches on the method itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ovss_ros.core.config import PIPELINE_METHODS, PROPOSAL_METHODS, EngineConfig
from ovss_ros.core.method_context import Loaded
from ovss_ros.core.method_pipelines import update_pipeline
from ovss_ros.core.methods.dense.method import update_dense
from ovss_ros.core.methods.dense.settings import LAST_BLOCK_MODES
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


# A family's update: (the method in force or None, the new config, the vocabulary, whether the
# vocabulary is new, what is loaded) -> the method for them, ready. Transactional: on any
# exception the method in force is unchanged (what was loaded for the change is released).
FamilyUpdate = Callable[[Any, EngineConfig, list[ClassEntry], bool, Loaded], Method]

FAMILIES: dict[str, str] = {
    **{name: "dense" for name in LAST_BLOCK_MODES},
    **{name: "deop" if name in PROPOSAL_METHODS else name for name in PIPELINE_METHODS},
}
UPDATES: dict[str, FamilyUpdate] = {
    "dense": update_dense,
    "pnp_ovss": update_pipeline,
    "deop": update_pipeline,
}


def family(method: str) -> str:
    """The family folder under ``core/methods`` that runs ``method``; KeyError if unknown."""
    return FAMILIES[method]


def update_for(method: str) -> FamilyUpdate:
    """The update function of the family that runs ``method``."""
    return UPDATES[family(method)]
