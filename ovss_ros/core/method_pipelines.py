"""The methods with their own pipeline, behind the Segmenter: PnP-OVSS, DeOP, two-stream.

The dense methods (naclip, sclip, ...) are the engine's own forward. These three bring their own
pipeline: ``PnpOvss`` (issue 9, Luo et al. CVPR 2024), which needs a second model, the VLM;
``Deop`` and ``TwoStream`` (issue 10, Han et al. ICCV 2023), which may read a DeOP checkpoint.
``config`` maps ``EngineConfig`` fields onto their settings (``PNP_FIELDS``, ``DEOP_FIELDS``,
``TWOSTREAM_FIELDS``) and checks them (``check_pipeline_settings``, part of
``EngineConfig.validate``); this module builds a :class:`Pipeline` from the engine's loaded CLIP
and its text encoder, which the pipeline shares: its text cache, its templates and its stop
event.

``build_pipeline`` is transactional: it loads what is missing (the VLM, a checkpoint), builds the
method and encodes the vocabulary, and only returns a ready pipeline; on any error the previous
pipeline and the shared text encoder are as they were.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder
from ovss_ros.core.config import (
    PNP_FIELDS,
    VLM_LOAD_FIELDS,
    EngineConfig,
    method_fields,
    method_settings,
    renamed,
)
from ovss_ros.core.methods.deop.deop import Deop
from ovss_ros.core.methods.deop.twostream import TwoStream, check_crop_cost
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss
from ovss_ros.core.methods.pnp_ovss.vlm_loading import LoadedVlm, load_vlm
from ovss_ros.core.segmentation import Segmentation, label_dtype
from ovss_ros.core.stopping import check_stop
from ovss_ros.core.vocabulary import ClassEntry

logger = logging.getLogger(__name__)

# What a pipeline is built from, besides its method's fields: a change rebuilds it.
SHARED_FIELDS = ("templates", "background_words", "deop_checkpoint", *VLM_LOAD_FIELDS)


@dataclass
class Pipeline:
    """A built, ready pipeline of one of PIPELINE_METHODS and the config it was built from."""

    method: str
    core: object  # PnpOvss | Deop | TwoStream
    config: EngineConfig  # the settings in force (the Segmenter updates it on each change)
    vlm: LoadedVlm | None = None
    stop: threading.Event | None = None

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
                    raise renamed(error, PNP_FIELDS) from None
                if classes is not None:
                    self.core.check_classes(classes)
            return
        if config.deop_checkpoint == self.config.deop_checkpoint:
            try:
                self.core._check(method_settings(config), self.core.modules)
            except ValueError as error:
                raise renamed(error, method_fields(self.method)) from None

    def release(self) -> None:
        """Nothing to free explicitly: the VLM or the checkpoint's modules may live on in the
        pipeline built next (``build_pipeline`` reuses them); they go when no pipeline holds
        them."""

    def batch_groups(self, images: Sequence[np.ndarray]) -> list[list[int]]:
        """PnP-OVSS: one image at a time (each its own prompt and gradient); the others: images
        of equal resized size."""
        if self.method == "pnp_ovss":
            return [[index] for index in range(len(images))]
        return self.core.batch_groups(images)

    def segment_many(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """Segment ``images``, checking ``stop`` before each batch group (PnP-OVSS also before
        each dropout round). PnP-OVSS pixels below the config's ``score_threshold`` (its own
        confidence scale) are unlabeled; DeOP and two-stream apply it themselves."""
        stop, score_threshold = self.stop, self.config.score_threshold
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


def check_with_clip(config: EngineConfig, clip: LoadedClip) -> None:
    """Checks of ``config``'s pipeline method that need only the loaded CLIP, made whichever
    method is in force (so that a switch to it is refused up front): two-stream's crop batch
    against this CLIP's per-crop cost (FrameBudgetError)."""
    if config.method == "twostream":
        check_crop_cost(clip, config.twostream_crop_batch, "twostream_crop_batch")


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
                raise renamed(error, PNP_FIELDS) from None
            core.stop = stop
        else:
            kind = {"deop": Deop, "twostream": TwoStream}[method]
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
                raise renamed(error, method_fields(method)) from None
            core.text = text  # the engine's: its cache and stop event
            text.set_templates(settings.templates)
            vlm = None
        if classes:
            core.set_classes(list(classes))
    except BaseException:
        text.set_templates(templates)
        raise
    return Pipeline(method, core, config, vlm, stop)


__all__ = ["Pipeline", "build_pipeline", "check_with_clip", "needs_rebuild"]
