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
from ovss_ros.core.method_pipelines import prepare_pipeline, update_pipeline
from ovss_ros.core.methods.dense.method import DenseMethod, DensePrepared, update_dense
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


class MethodChange(Protocol):
    """A change prepared by a family (``FamilyPrepare``), not in force: ``method`` is the method
    it will put in force (maybe the one in force, to be changed by ``commit``)."""

    method: Method

    def commit(self) -> None:
        """Put the change in force: cheap, cannot fail (everything slow was prepared)."""

    def discard(self) -> None:
        """Drop the change unapplied: free what was loaded for it only."""


# A family's prepare: the same arguments as FamilyUpdate -> the change, prepared (text encoded,
# a model or checkpoint loaded) without changing the method in force, which may go on
# segmenting meanwhile from another thread. On any exception nothing changes.
FamilyPrepare = Callable[[Any, EngineConfig, list[ClassEntry], bool, Loaded], MethodChange]


class DenseChange:
    """The dense family's prepared change (``MethodChange``): ``DenseMethod.prepare``'s result,
    committed with ``DenseMethod.commit``."""

    def __init__(self, method: DenseMethod, prepared: DensePrepared) -> None:
        self.method, self.prepared = method, prepared

    def commit(self) -> None:
        self.method.commit(self.prepared)

    def discard(self) -> None:
        sd2 = self.prepared.sd2
        if sd2 is not None and sd2 is not self.method.sd2:
            sd2.release()


def prepare_dense(
    current: object, config: EngineConfig, classes: list[ClassEntry], given: bool, loaded: Loaded
) -> DenseChange:
    """The dense family's prepare (``FamilyPrepare``): the DenseMethod in force, or a new one on
    the loaded CLIP, with the change prepared (``DenseMethod.prepare``) and not committed."""
    dense = current if isinstance(current, DenseMethod) else None
    dense = dense or DenseMethod(loaded.clip, loaded.text, config, loaded.stop)
    return DenseChange(dense, dense.prepare(config, classes, given, loaded.attempt))


PREPARES: dict[str, FamilyPrepare] = {
    "dense": prepare_dense,
    "pnp_ovss": prepare_pipeline,
    "deop": prepare_pipeline,
}


def prepare_for(method: str) -> FamilyPrepare:
    """The prepare function of the family that runs ``method``."""
    return PREPARES[family(method)]


def family(method: str) -> str:
    """The family folder under ``core/methods`` that runs ``method``; KeyError if unknown."""
    return FAMILIES[method]


def update_for(method: str) -> FamilyUpdate:
    """The update function of the family that runs ``method``."""
    return UPDATES[family(method)]
