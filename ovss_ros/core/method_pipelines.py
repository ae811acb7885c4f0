"""The methods with their own pipeline, behind the Segmenter: PnP-OVSS, DeOP, two-stream.

The dense methods (naclip, sclip, ...) are the engine's own forward. These three bring their own
pipeline: ``PnpOvss`` (issue 9, Luo et al. CVPR 2024), which needs a second model, the VLM;
``Deop`` and ``TwoStream`` (issue 10, Han et al. ICCV 2023), which may read a DeOP checkpoint.
This module maps ``EngineConfig`` fields onto their settings (``PNP_FIELDS``, ``DEOP_FIELDS``,
``TWOSTREAM_FIELDS``), checks them (``check_pipeline_settings``, part of
``EngineConfig.validate``) and builds a :class:`Pipeline` from the engine's loaded CLIP and its
text encoder, which the pipeline shares: its text cache, its templates and its stop event.

``build_pipeline`` is transactional: it loads what is missing (the VLM, a checkpoint), builds the
method and encodes the vocabulary, and only returns a ready pipeline; on any error the previous
pipeline and the shared text encoder are as they were.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder
from ovss_ros.core.config import PIPELINE_METHODS, VLM_LOAD_FIELDS, EngineConfig
from ovss_ros.core.file_checks import FileCheckError, regular_file
from ovss_ros.core.methods.dense.forward import LAST_BLOCK_MODES
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss, PnpOvssSettings
from ovss_ros.core.methods.pnp_ovss.vlm_loading import LoadedVlm, load_vlm
from ovss_ros.core.segmentation import Segmentation, label_dtype
from ovss_ros.core.stopping import check_stop
from ovss_ros.core.vocabulary import ClassEntry

logger = logging.getLogger(__name__)

# EngineConfig field -> the method's settings field.
PNP_FIELDS = {
    "pnp_image_size": "image_size",
    "pnp_layer": "layer",
    "pnp_head": "head",
    "pnp_threshold": "threshold",
    "pnp_dropout_rounds": "dropout_rounds",
    "pnp_dropout_patches": "dropout_patches",
    "pnp_presence": "presence",
    "pnp_presence_threshold": "presence_threshold",
    "pnp_blur": "blur",
    "pnp_refine": "refine",
}
PROPOSAL_FIELDS = {
    "proposals": "proposals",
    "proposal_source": "proposal_source",
    "short_side": "short_side",
    "max_long_side": "max_long_side",
    "templates": "templates",
    "background_words": "background_words",
    "score_threshold": "score_threshold",
    "proposal_logit_scale": "logit_scale",
    "mask_cells": "mask_cells",
    "superpixel_compactness": "superpixel_compactness",
    "cluster_iterations": "cluster_iterations",
}
DEOP_FIELDS = PROPOSAL_FIELDS | {
    "deop_pooling": "pooling",
    "severance_residual": "severance_residual",
}
TWOSTREAM_FIELDS = PROPOSAL_FIELDS | {"twostream_crop_batch": "crop_batch"}
# Dense-method settings that would do nothing under these methods: refused unless off.
DENSE_ONLY = {
    "refinement": "none",
    "pamr": False,
    "upsample": "bilinear",
    "area_threshold": 0.0,
    "crop": 0,
}
# What a pipeline is built from, besides its method's fields: a change rebuilds it.
SHARED_FIELDS = ("templates", "background_words", "deop_checkpoint", *VLM_LOAD_FIELDS)


def method_fields(method: str) -> dict[str, str]:
    """EngineConfig field -> settings field of ``method`` (one of PIPELINE_METHODS)."""
    return {"pnp_ovss": PNP_FIELDS, "deop": DEOP_FIELDS, "twostream": TWOSTREAM_FIELDS}[method]


def _proposal_types() -> dict[str, type]:
    # Imported here: proposal_segmentation imports the engine, which imports this module.
    from ovss_ros.core.methods.deop.deop import Deop, DeopSettings
    from ovss_ros.core.methods.deop.twostream import TwoStream, TwoStreamSettings

    return {"deop": (Deop, DeopSettings), "twostream": (TwoStream, TwoStreamSettings)}


def method_settings(config: EngineConfig, method: str | None = None) -> object:
    """The settings object of ``method`` (default ``config.method``) that ``config`` describes
    (not validated): PnpOvssSettings, DeopSettings or TwoStreamSettings."""
    method = method or config.method
    values = {dst: getattr(config, src) for src, dst in method_fields(method).items()}
    if method == "pnp_ovss":
        return PnpOvssSettings(**values)
    values["background_words"] = tuple(values["background_words"])
    return _proposal_types()[method][1](**values)


def _renamed(error: ValueError, names: dict[str, str]) -> ValueError:
    """The method's message with its settings' names replaced by the EngineConfig names that
    users set (``layer must be ...`` -> ``pnp_layer must be ...``)."""
    text = str(error)
    for engine_name, own in names.items():
        if engine_name != own:
            text = re.sub(rf"(?<!\w){own}(?!\w)", engine_name, text)
    return type(error)(text)


def check_pipeline_settings(config: EngineConfig) -> None:
    """Model-independent checks of the pnp_ovss / deop / twostream fields; ValueError.

    Every method's settings are checked whatever ``method`` is (so a bad value is refused when it
    is set, not when the method is switched to). With one of these methods selected: the dense
    methods' refinements must be off, pnp_ovss takes no background words, a ``deop_checkpoint``
    must be an existing file, and what needs a checkpoint (proposal_source learned, deop_pooling
    cal) needs one.
    """
    for method in PIPELINE_METHODS:
        names = method_fields(method)
        try:
            method_settings(config, method).validate()
        except ValueError as error:
            raise _renamed(error, names) from None
    method = config.method
    if method not in PIPELINE_METHODS:
        return
    for name, off in DENSE_ONLY.items():
        if getattr(config, name) != off:
            raise ValueError(
                f"{name} applies to the dense methods ({', '.join(LAST_BLOCK_MODES)}), not to "
                f"method {method}: set {name} to {off!r}"
            )
    if method == "pnp_ovss":
        if config.background_words:
            raise ValueError(
                "method pnp_ovss has no background words (its background is where no class "
                "map fires): set background_words to []"
            )
        return
    checkpoint = config.deop_checkpoint.strip()
    if checkpoint:
        try:
            regular_file(checkpoint, "deop_checkpoint")
        except FileCheckError as error:
            raise ValueError(
                f"{error}: set it to a file made by ovss-train-deop, or to '' for training-free "
                "DeOP"
            ) from None
    if not checkpoint and config.proposal_source == "learned":
        raise ValueError(
            "proposal_source learned needs a deop_checkpoint with a proposal head: set "
            "deop_checkpoint, or proposal_source to auto, superpixels or clusters"
        )
    if not checkpoint and method == "deop" and config.deop_pooling == "cal":
        raise ValueError(
            "deop_pooling cal needs a deop_checkpoint with a CAL decoder: set deop_checkpoint, "
            "or deop_pooling to auto or mean"
        )


@dataclass
class Pipeline:
    """A built, ready pipeline of one of PIPELINE_METHODS and the config it was built from."""

    method: str
    core: object  # PnpOvss | Deop | TwoStream
    config: EngineConfig
    vlm: LoadedVlm | None = None

    def describe(self) -> tuple[str, bool]:
        """(what runs, in words; whether it deserves a warning): for the node's log."""
        config, core = self.config, self.core
        if self.method == "pnp_ovss":
            settings = core.settings
            return (
                f"pnp_ovss with {config.vlm_model} {config.vlm_pretrained}: layer "
                f"{settings.layer}, head {settings.head}, {settings.dropout_rounds} dropout "
                f"rounds (one gradient pass each), refinement {settings.refinement()}",
                False,
            )
        source = core.proposal_source()
        pooling = f", {core.pooling()} pooling" if self.method == "deop" else ""
        if core.checkpoint is None:
            return (
                f"{self.method} without a checkpoint: training-free {source} proposals"
                f"{pooling} (set deop_checkpoint to a file from ovss-train-deop for the trained "
                "method)",
                True,
            )
        path = core.checkpoint.path
        return f"{self.method} with checkpoint {path}: {source} proposals{pooling}", False

    def check(self, config: EngineConfig, classes: Sequence[ClassEntry] | None = None) -> None:
        """Checks of ``config`` against what this pipeline has loaded (the VLM's layers and
        heads, the checkpoint's heads), where ``config`` would keep them; ValueError. With
        ``classes``, PnP-OVSS also checks that the prompt with every class fits the loaded
        VLM's text positions (VocabularyError)."""
        if config.method != self.method:
            return
        if self.method == "pnp_ovss":
            if all(getattr(config, n) == getattr(self.config, n) for n in VLM_LOAD_FIELDS):
                try:
                    self.core.check(method_settings(config))
                except ValueError as error:
                    raise _renamed(error, PNP_FIELDS) from None
                if classes is not None:
                    self.core.check_classes(classes)
            return
        if config.deop_checkpoint == self.config.deop_checkpoint:
            try:
                self.core._check(method_settings(config), self.core.modules)
            except ValueError as error:
                raise _renamed(error, method_fields(self.method)) from None

    def batch_groups(self, images: Sequence[np.ndarray]) -> list[list[int]]:
        """PnP-OVSS: one image at a time (each its own prompt and gradient); the others: images
        of equal resized size."""
        if self.method == "pnp_ovss":
            return [[index] for index in range(len(images))]
        return self.core.batch_groups(images)

    def segment_many(
        self,
        images: Sequence[np.ndarray],
        stop: threading.Event | None,
        score_threshold: float,
    ) -> list[Segmentation]:
        """Segment ``images``, checking ``stop`` before each batch group (PnP-OVSS also before
        each dropout round). PnP-OVSS pixels below ``score_threshold`` (its own confidence
        scale) are unlabeled; DeOP and two-stream apply it themselves."""
        results: list[Segmentation | None] = [None] * len(images)
        for members in self.batch_groups(images):
            check_stop(stop, f"{self.method} batch")
            done = self.core.segment_many([images[i] for i in members])
            for index, segmentation in zip(members, done, strict=True):
                results[index] = segmentation
        if self.method == "pnp_ovss" and score_threshold > 0:
            for segmentation in results:
                unlabeled = int(np.iinfo(label_dtype(len(segmentation.class_names))).max)
                segmentation.labels[segmentation.confidence < score_threshold] = unlabeled
        return results


def needs_rebuild(pipeline: Pipeline | None, config: EngineConfig) -> bool:
    """Whether ``config`` needs another pipeline than ``pipeline`` (score_threshold does not)."""
    if pipeline is None or pipeline.method != config.method:
        return True
    names = (*method_fields(config.method), *SHARED_FIELDS)
    return any(getattr(pipeline.config, n) != getattr(config, n) for n in names)


def build_pipeline(
    config: EngineConfig,
    clip: LoadedClip,
    text: TextEncoder,
    classes: Sequence[ClassEntry],
    previous: Pipeline | None = None,
    stop: threading.Event | None = None,
) -> Pipeline:
    """A ready pipeline for ``config.method``, with ``classes`` set (when any).

    Reuses ``previous``'s VLM (pnp_ovss) or loaded checkpoint (deop, twostream) when ``config``
    names the same one; otherwise loads it: ``load_vlm`` with the engine's device and precision,
    or the ``deop_checkpoint`` file. Raises ModelLoadError (VLM), CheckpointError (missing,
    corrupt, trained on another CLIP), ValueError (settings the loaded model refuses),
    VocabularyError, Stopped; ``previous`` and ``text`` are then unchanged.
    """
    method = config.method
    templates = text.templates
    try:
        if method == "pnp_ovss":
            same = (
                previous is not None
                and previous.vlm is not None
                and all(getattr(previous.config, n) == getattr(config, n) for n in VLM_LOAD_FIELDS)
            )
            vlm = (
                previous.vlm
                if same
                else load_vlm(
                    config.vlm_model, config.vlm_pretrained, config.device, config.precision
                )
            )
            try:
                core = PnpOvss(clip, vlm, method_settings(config), config.templates, text)
            except ValueError as error:
                raise _renamed(error, PNP_FIELDS) from None
            core.stop = stop
        else:
            kind = _proposal_types()[method][0]
            settings = method_settings(config)
            checkpoint = config.deop_checkpoint.strip() or None
            keep = (
                previous is not None
                and previous.method in ("deop", "twostream")
                and previous.config.deop_checkpoint == config.deop_checkpoint
            )
            try:
                if keep:
                    core = kind(clip, settings, modules=previous.core.modules)
                    core.checkpoint = previous.core.checkpoint
                else:
                    core = kind(clip, settings, checkpoint=checkpoint)
            except ValueError as error:  # CheckpointError too: its text names deop_checkpoint
                raise _renamed(error, method_fields(method)) from None
            core.text = text  # the engine's: its cache and stop event
            text.set_templates(settings.templates)
            vlm = None
        if classes:
            core.set_classes(list(classes))
    except BaseException:
        text.set_templates(templates)
        raise
    return Pipeline(method, core, config, vlm)


__all__ = [
    "DEOP_FIELDS",
    "PNP_FIELDS",
    "TWOSTREAM_FIELDS",
    "Pipeline",
    "build_pipeline",
    "check_pipeline_settings",
    "method_fields",
    "method_settings",
    "needs_rebuild",
]
