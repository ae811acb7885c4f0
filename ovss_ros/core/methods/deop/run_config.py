"""The settings of DeOP, superpixel_clip and the two-stream baseline, checked without a model:
what every proposal method has (``ProposalConfig``), DeOP's pooling and severance (Han et al.,
ICCV 2023, CongHan0808/DeOP), superpixel_clip's residual, the two-stream crop batch. Limits that
need the loaded CLIP or a checkpoint are the methods' ``_check``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovss_ros.core.clip.templates import template_set
from ovss_ros.core.frame_budget import MAX_LONG_SIDE_LIMIT, check_crop_batch, max_crop_batch
from ovss_ros.core.methods.deop.settings import (
    MAX_PROPOSALS,
    POOLINGS,
    PROPOSAL_SOURCES,
    SEVERANCE_RESIDUAL,
    SUPERPIXEL_CLIP_RESIDUAL,
)


@dataclass
class ProposalConfig:
    """Settings every proposal-classification method has (all changeable between frames)."""

    proposals: int = 100  # at most this many proposals per frame, 1..1000
    proposal_source: str = "auto"  # auto (learned if the checkpoint has a head) | superpixels |
    #                                clusters | learned
    short_side: int = 448  # resize so the short side is this many pixels (whole patches); 0 keeps
    max_long_side: int = 2048  # and the long side at most this many (the engine's frame bound)
    templates: str = "imagenet"  # prompt templates: imagenet | single | custom joined by |
    background_words: tuple[str, ...] = ()  # texts that mean "none of the classes"
    score_threshold: float = 0.0  # pixels whose best class probability is below are unlabeled
    logit_scale: float = 100.0  # proposal-text softmax temperature (DeOP's get_sim_logits: 100)
    mask_cells: int = 4  # mask grid cells per patch side, 1..16 (DeOP: masks at 1/4 image, 16 px)
    superpixel_compactness: float = 10.0  # SLIC compactness (> 0): larger = squarer superpixels
    cluster_iterations: int = 10  # k-means iterations of the ``clusters`` source, 1..100

    def validate(self) -> None:
        """Raise ValueError with the reason for the first bad value."""
        if self.proposal_source not in ("auto", *PROPOSAL_SOURCES):
            raise ValueError(
                f"unknown proposal_source {self.proposal_source!r}: use one of "
                f"{['auto', *PROPOSAL_SOURCES]}"
            )
        check_int(self.proposals, "proposals", 1, MAX_PROPOSALS)
        check_int(self.short_side, "short_side", 0, 10_000)
        check_int(self.max_long_side, "max_long_side", 1, MAX_LONG_SIDE_LIMIT)
        check_int(self.mask_cells, "mask_cells", 1, 16)
        check_int(self.cluster_iterations, "cluster_iterations", 1, 100)
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        for name in ("logit_scale", "superpixel_compactness"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if any(not isinstance(w, str) or not w.strip() for w in self.background_words):
            raise ValueError("background_words must be non-empty strings")
        template_set(self.templates)


def check_int(value: object, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass
class DeopConfig(ProposalConfig):
    """DeOP's settings; every field can change between frames (``Deop.reconfigure``)."""

    pooling: str = "auto"  # auto (cal with a checkpoint, else mean) | cal | mean
    severance_residual: float = SEVERANCE_RESIDUAL  # residual scale of the severed block, [0, 1]

    def validate(self) -> None:
        super().validate()
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}: use one of {list(POOLINGS)}")
        if not 0.0 <= self.severance_residual <= 1.0:
            raise ValueError(
                f"severance_residual must be in [0, 1], got {self.severance_residual}"
            )


@dataclass
class SuperpixelClipConfig(DeopConfig):
    """superpixel_clip's settings: DeOP's, with its own severed-block residual default (0.2,
    ``superpixel_clip.severance_residual``)."""

    severance_residual: float = SUPERPIXEL_CLIP_RESIDUAL


@dataclass
class TwoStreamConfig(ProposalConfig):
    """The two-stream baseline's settings (changeable between frames)."""

    crop_batch: int = 32  # crops per encode_image call, within the per-frame budget
    # classes (by name) the release's proposal network was trained on: its ensemble's seen ones
    seen_classes: tuple[str, ...] = ()

    def validate(self) -> None:
        super().validate()
        if isinstance(self.seen_classes, str) or any(
            not isinstance(name, str) or not name.strip() for name in self.seen_classes
        ):
            raise ValueError("seen_classes must be a list of non-empty class names")
        batch = self.crop_batch
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            check_int(batch, "crop_batch", 1, max_crop_batch())  # raises
        check_crop_batch(self.crop_batch, setting="crop_batch")  # ViT-B/16; _check: the model
