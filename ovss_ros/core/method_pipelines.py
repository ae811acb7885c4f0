"""The methods with their own pipeline, behind the Segmenter: PnP-OVSS, DeOP, two-stream,
superpixel_clip.

The dense methods (naclip, sclip, ...) are the engine's own forward. These bring their own
pipeline: ``PnpOvss`` (issue 9, Luo et al. CVPR 2024), which needs a second model, the VLM;
``Deop`` and ``TwoStream`` (issue 10, Han et al. ICCV 2023), which read a DeOP checkpoint (deop
must, twostream may); ``SuperpixelClip``, DeOP's pipeline without one (training-free).
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
from dataclasses import dataclass, fields

import numpy as np

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder
from ovss_ros.core.config import EngineConfig
from ovss_ros.core.method_context import Loaded
from ovss_ros.core.methods.deop.deop import Deop, SuperpixelClip
from ovss_ros.core.methods.deop.published import PublishedDeop, load_release
from ovss_ros.core.methods.deop.published_twostream import PublishedTwoStream
from ovss_ros.core.methods.deop.released_checkpoint import released_tensors
from ovss_ros.core.methods.deop.run_config import (
    DeopConfig,
    ProposalConfig,
    SuperpixelClipConfig,
    TwoStreamConfig,
)
from ovss_ros.core.methods.deop.twostream import TwoStream, check_crop_cost
from ovss_ros.core.methods.pnp_ovss.pnp_ovss import PnpOvss
from ovss_ros.core.methods.pnp_ovss.vlm_loading import LoadedVlm, load_vlm
from ovss_ros.core.segmentation import Segmentation, label_dtype
from ovss_ros.core.stopping import check_stop
from ovss_ros.core.vocabulary import ClassEntry

logger = logging.getLogger(__name__)

# The shared settings a proposal method runs with (``ProposalConfig``'s fields besides deop.*).
PROPOSAL_SHARED = (
    "short_side",
    "max_long_side",
    "templates",
    "background_words",
    "score_threshold",
)
# The settings groups each pipeline is built from: a change in one rebuilds it.
GROUPS = {
    "pnp_ovss": ("pnp",),
    "deop": ("deop",),
    "twostream": ("deop", "twostream"),
    "superpixel_clip": ("deop", "superpixel_clip"),
}


def proposal_config(config: EngineConfig, method: str | None = None) -> ProposalConfig:
    """What DeOP (``DeopConfig``), superpixel_clip (``SuperpixelClipConfig``) or two-stream
    (``TwoStreamConfig``) runs with: its ``deop.*`` settings, overridden by its own group's
    (``twostream.*``, ``superpixel_clip.*``), and the shared ones it needs."""
    method = method or config.method
    kind = {"twostream": TwoStreamConfig, "superpixel_clip": SuperpixelClipConfig}.get(
        method, DeopConfig
    )
    groups = [getattr(config, group) for group in GROUPS[method]]
    values = {name: getattr(config, name) for name in PROPOSAL_SHARED}
    for field in fields(kind):  # the run config's fields, by name from the settings groups
        for group in groups:
            if hasattr(group, field.name):
                values[field.name] = getattr(group, field.name)
    return kind(**values)


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
                f"pnp_ovss with {config.pnp.vlm_model} {config.pnp.vlm_pretrained}: layer "
                f"{settings.layer}, head {settings.head}, {settings.dropout_rounds} dropout "
                f"rounds (one gradient pass each), refinement {settings.refinement()}",
                False,
            )
        if isinstance(core, PublishedDeop | PublishedTwoStream):
            return core.describe(), False
        source = core.proposal_source()
        pooling = f", {core.pooling()} pooling" if self.method == "deop" else ""
        if self.method == "superpixel_clip":
            return (
                f"superpixel_clip (training-free): {source} proposals, severed last block "
                f"(residual {core.settings.severance_residual:g}), mean pooling",
                False,
            )
        if core.checkpoint is None:
            return (
                f"{self.method} without a checkpoint: training-free {source} proposals"
                f"{pooling} (set deop.checkpoint to a file from ovss-train-deop for the trained "
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
            if same_vlm(config, self.config):
                self.core.check(config.pnp)
                if classes is not None:
                    self.core.check_classes(classes)
            return
        if (
            self.method == "superpixel_clip"
            or config.deop.checkpoint == self.config.deop.checkpoint
        ):
            self.core._check(proposal_config(config), self.core.modules)

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
        check_crop_cost(clip, config.twostream.crop_batch, "twostream.crop_batch")


def needs_rebuild(pipeline: Pipeline | None, config: EngineConfig) -> bool:
    """Whether ``config`` needs another pipeline than ``pipeline`` (score_threshold does not)."""
    if pipeline is None or pipeline.method != config.method:
        return True
    old, new = pipeline.config, config
    groups = GROUPS[config.method]
    shared = ("templates", "background_words") + (
        PROPOSAL_SHARED if config.method != "pnp_ovss" else ()
    )
    return any(getattr(old, g) != getattr(new, g) for g in groups) or any(
        getattr(old, n) != getattr(new, n) for n in shared
    )


def same_vlm(a: EngineConfig, b: EngineConfig) -> bool:
    """Whether ``a`` and ``b`` name the same VLM (a change needs it loaded anew)."""
    return (a.pnp.vlm_model, a.pnp.vlm_pretrained) == (b.pnp.vlm_model, b.pnp.vlm_pretrained)


def update_pipeline(
    current: object, config: EngineConfig, classes: list[ClassEntry], given: bool, loaded: Loaded
) -> Pipeline:
    """The pipelines' update (``core.method.FamilyUpdate``): ``prepare_pipeline``, then its
    commit; on any exception the method in force is unchanged."""
    change = prepare_pipeline(current, config, classes, given, loaded)
    change.commit()
    return change.method


@dataclass
class PipelineChange:
    """A pipeline prepared for a change (``core.method.MethodChange``): ``method`` is ready
    and not in force; ``commit`` sets the settings in force on it (cannot fail)."""

    method: Pipeline
    config: EngineConfig
    announce: bool  # another pipeline than the one in force (not only a new vocabulary)

    def commit(self) -> None:
        self.method.config = self.config  # score_threshold and the shared settings in force
        if self.announce:
            logger.info("method %s", self.method.describe()[0])

    def discard(self) -> None:
        """Forget the prepared pipeline (what it loaded goes with its last reference)."""


def prepare_pipeline(
    current: object, config: EngineConfig, classes: list[ClassEntry], given: bool, loaded: Loaded
) -> PipelineChange:
    """The pipelines' prepare (``core.method.FamilyPrepare``): the pipeline in force if
    ``config`` keeps it and the vocabulary stays, else a new one built beside it
    (``build_pipeline``: the VLM or a checkpoint loaded or reused from the one in force, the
    vocabulary encoded); the pipeline in force is never changed, so frames go on with it
    meanwhile (from another thread). Raises what ``build_pipeline`` raises."""
    pipeline = current if isinstance(current, Pipeline) else None
    built, rebuild = pipeline, needs_rebuild(pipeline, config)
    if rebuild or given:
        built = loaded.attempt(
            lambda: build_pipeline(
                config, loaded.clip, loaded.text, classes, pipeline, loaded.stop
            )
        )
    return PipelineChange(built, config, rebuild)


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
    names the same one (superpixel_clip reads none); otherwise loads it: ``load_vlm`` with the
    engine's device and precision, or the ``deop.checkpoint`` file. Raises ModelLoadError (VLM),
    CheckpointError (missing, corrupt, trained on another CLIP), ValueError (settings the loaded
    model refuses), VocabularyError, Stopped; ``previous`` and ``text`` are then unchanged.
    """
    method = config.method
    templates = text.templates
    try:
        if method == "pnp_ovss":
            same = (
                previous is not None
                and previous.vlm is not None
                and same_vlm(previous.config, config)
            )
            vlm = (
                previous.vlm
                if same
                else load_vlm(
                    config.pnp.vlm_model,
                    config.pnp.vlm_pretrained,
                    config.device,
                    config.precision,
                )
            )
            core = PnpOvss(clip, vlm, config.pnp, config.templates, text)
            core.stop = stop
        else:
            settings = proposal_config(config)
            checkpoint = config.deop.checkpoint.strip() or None
            keep = (
                previous is not None
                and previous.method in ("deop", "twostream")
                and previous.config.deop.checkpoint == config.deop.checkpoint
            )
            kind = {"deop": Deop, "twostream": TwoStream}
            released = {"deop": PublishedDeop, "twostream": PublishedTwoStream}
            previous_release = getattr(previous.core, "released", None) if keep else None
            if method == "superpixel_clip":  # training-free: reads no checkpoint
                core = SuperpixelClip(clip, settings)
            elif previous_release is not None:  # the release's file, loaded already
                core = released[method](clip, settings, released=previous_release)
            elif not keep and checkpoint and (tensors := released_tensors(checkpoint)):
                release = load_release(checkpoint, clip, tensors)  # the file read once
                core = released[method](clip, settings, released=release)
            elif keep:
                core = kind[method](clip, settings, modules=previous.core.modules)
                core.checkpoint = previous.core.checkpoint
            else:
                core = kind[method](clip, settings, checkpoint=checkpoint)
            core.text = text  # the engine's: its cache and stop event
            text.set_templates(settings.templates)
            vlm = None
        if classes:
            core.set_classes(list(classes))
    except BaseException:
        text.set_templates(templates)
        raise
    return Pipeline(method, core, config, vlm, stop)


__all__ = [
    "Pipeline",
    "build_pipeline",
    "check_with_clip",
    "PipelineChange",
    "needs_rebuild",
    "prepare_pipeline",
    "proposal_config",
    "update_pipeline",
]
