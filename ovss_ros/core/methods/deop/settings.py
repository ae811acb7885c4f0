"""The settings of DeOP (``deop.*``), the two-stream baseline (``twostream.*``) and the
training-free superpixel_clip (``superpixel_clip.*``), checked without a model (no torch here).
DeOP: Han et al., ICCV 2023, CongHan0808/DeOP: 100 proposals, masks at a quarter of the image
(4 cells per 16 px patch), softmax of 100 x the cosine similarities (``get_sim_logits``), the
severed block's residual 1.0 as the released scripts run it (see ``SEVERANCE_RESIDUAL``).
twostream and superpixel_clip take their proposals from ``deop.*`` and own only what differs.
Limits that need the loaded CLIP or a checkpoint are the methods' ``_check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.frame_budget import check_crop_batch, max_crop_batch
from ovss_ros.core.settings import Settings, setting
from ovss_ros.core.vocabulary import MAX_CLASSES, MAX_NAMES_LENGTH

PROPOSAL_SOURCES = ("superpixels", "clusters", "learned")
MAX_PROPOSALS = 1000
POOLINGS = ("auto", "cal", "mean")
# The severed block's residual scale as released: the scripts run the learned-position block
# (ResidualAttentionBlockVitPosition in third_party/CLIP/clip/model.py of CongHan0808/DeOP), whose
# scaling is commented out, so 1.0; only the plain ResidualAttentionBlockVit scales layer 11's
# residual by 0.2 (``alphaShortcut``).
SEVERANCE_RESIDUAL = 1.0
# superpixel_clip's (ovss_ros's training-free method): 0.2, the plain block's scale, which the
# training-free mode ran with before it had its own name; it keeps the severed features closer to
# the value path (ClearCLIP: the residual hurts dense CLIP features).
SUPERPIXEL_CLIP_RESIDUAL = 0.2
DEOP = "DeOP (CongHan0808/DeOP)"


@dataclass(frozen=True)
class DeopSettings(Settings):
    """DeOP's settings (``method: deop``); two-stream and superpixel_clip use its proposal
    settings too. All can change at runtime (a new checkpoint is loaded in the worker)."""

    namespace: ClassVar[str] = "deop"

    checkpoint: str = setting(
        "",
        "the DeOP release's model file (model_final.pth: published DeOP, on CLIP ViT-B-16 "
        "openai) or a file from ovss-train-deop (trained on this node's CLIP): method deop "
        "needs one (its proposal network); optional for twostream; superpixel_clip reads none",
        constraints="an existing file; may be empty unless method is deop",
        source="ovss_ros",
    )
    proposals: int = setting(
        100,
        "at most this many mask proposals per frame (deop, twostream, superpixel_clip)",
        minimum=1,
        maximum=MAX_PROPOSALS,
        source=DEOP + " (100 queries)",
    )
    proposal_source: str = setting(
        "auto",
        "class-agnostic mask proposals: superpixels (SLIC), clusters (k-means of CLIP "
        "features), learned (the checkpoint's proposal head); auto = learned with such a "
        "checkpoint, else superpixels",
        choices=("auto", *PROPOSAL_SOURCES),
        source="ovss_ros",
    )
    logit_scale: float = setting(
        100.0,
        "softmax temperature of the proposal-text cosine similarities",
        minimum=0.0,
        maximum=1000.0,
        open_minimum=True,
        source=DEOP + " get_sim_logits",
    )
    mask_cells: int = setting(
        4,
        "proposal mask cells per patch side",
        minimum=1,
        maximum=16,
        constraints="the checkpoint's, when its proposal head is used",
        source=DEOP + " (masks at 1/4 of the image)",
    )
    superpixel_compactness: float = setting(
        10.0,
        "SLIC compactness of the superpixels source (larger = squarer)",
        minimum=0.0,
        maximum=1000.0,
        open_minimum=True,
        source="scikit-image slic default",
    )
    cluster_iterations: int = setting(
        10, "k-means iterations of the clusters source", minimum=1, maximum=100,
        source="ovss_ros",
    )
    pooling: str = setting(
        "auto",
        "proposal embedding: cal (the checkpoint's anchor decoder) or mean (over the mask); "
        "auto = cal with a checkpoint, else mean",
        choices=POOLINGS,
        source=DEOP + " (CAL)",
    )
    severance_residual: float = setting(
        SEVERANCE_RESIDUAL,
        "residual scale of DeOP's severed last CLIP block (method deop; superpixel_clip has "
        "its own)",
        minimum=0.0,
        maximum=1.0,
        source=DEOP + " (the released learned-position block: 1.0)",
    )


@dataclass(frozen=True)
class TwoStreamSettings(Settings):
    """The two-stream baseline's own setting (``method: twostream``; its proposals are
    ``deop.*``)."""

    namespace: ClassVar[str] = "twostream"

    crop_batch: int = setting(
        32,
        "masked proposal crops per CLIP forward",
        minimum=1,
        maximum=max_crop_batch(),
        constraints="the CLIP activation of the batch within the per-frame budget",
        budget=check_crop_batch,
        source="ovss_ros",
    )
    seen_classes: tuple[str, ...] = setting(
        (),
        "names of the classes the DeOP release's proposal network was trained on (COCO-Stuff's "
        "156 seen ones as released): with that file the ensemble weighs these classes' "
        "proposal scores 0.8 and CLIP's 0.2, every other class the reverse; empty: every class "
        "unseen (the release on a data set without a training split); ovss-eval gives the data "
        "set's split unless set",
        constraints="class names as the vocabulary's entries name them",
        source=DEOP + " ZeroShotMaskFormer.semantic_inference (trainable_flag)",
    )

    def check(self) -> None:
        """ValueError for a seen-class list the vocabulary would refuse as class names: more
        than ``MAX_CLASSES`` names, a blank one, or one longer than ``MAX_NAMES_LENGTH``."""
        names = self.seen_classes
        if len(names) > MAX_CLASSES:
            raise ValueError(
                f"twostream.seen_classes has {len(names)} names, at most {MAX_CLASSES}"
            )
        for index, name in enumerate(names):
            if not name.strip():
                raise ValueError(f"twostream.seen_classes entry {index} is blank: name a class")
            if len(name) > MAX_NAMES_LENGTH:
                raise ValueError(
                    f"twostream.seen_classes entry {index} has {len(name)} characters, at most "
                    f"{MAX_NAMES_LENGTH} (a class name)"
                )


@dataclass(frozen=True)
class SuperpixelClipSettings(Settings):
    """superpixel_clip's own setting (``method: superpixel_clip``, ovss_ros's training-free
    method: superpixel or cluster proposals, DeOP's value-only severed last block, mean pooling;
    its proposals are ``deop.*``)."""

    namespace: ClassVar[str] = "superpixel_clip"

    severance_residual: float = setting(
        SUPERPIXEL_CLIP_RESIDUAL,
        "residual scale of the severed last CLIP block (deop.severance_residual is DeOP's)",
        minimum=0.0,
        maximum=1.0,
        source="ovss_ros (the scale the training-free mode ran with; DeOP's plain block's "
        "0.2, its released scripts run 1.0)",
    )


DEOP_NEEDS_CHECKPOINT = (
    "method deop needs its proposal network and deop.checkpoint is empty: DeOP classifies the "
    "masks of a trained proposal network (without one the severed block's weights are all 1 on "
    "superpixels, so it is not DeOP): set deop.checkpoint to the DeOP release's model_final.pth "
    "(published DeOP) or a file from ovss-train-deop, or use method superpixel_clip for the "
    "training-free mode"
)


def check_proposal_method(method: str, deop: DeopSettings) -> None:
    """What deop, twostream and superpixel_clip refuse of the ``deop.*`` settings, with
    ``method`` selected: deop needs a ``deop.checkpoint`` (its proposal network), which must be
    an existing file (twostream's too, when set); what needs a checkpoint (proposal_source
    learned, pooling cal) needs one; superpixel_clip reads no checkpoint. ValueError."""
    from ovss_ros.core.file_checks import FileCheckError, regular_file

    checkpoint = deop.checkpoint.strip() if method != "superpixel_clip" else ""
    if method == "deop" and not checkpoint:
        raise ValueError(DEOP_NEEDS_CHECKPOINT)
    if checkpoint:
        try:
            regular_file(checkpoint, "deop.checkpoint")
        except FileCheckError as error:
            raise ValueError(
                f"{error}: set it to the DeOP release's model_final.pth or a file made by "
                "ovss-train-deop"
                + (", or to '' for the training-free twostream" if method == "twostream" else "")
            ) from None
    if method == "superpixel_clip":
        if deop.proposal_source == "learned":
            raise ValueError(
                "deop.proposal_source learned needs a trained proposal head, and method "
                "superpixel_clip is training-free: set deop.proposal_source to auto, superpixels "
                "or clusters, or use method deop with a deop.checkpoint"
            )
        if deop.pooling == "cal":
            raise ValueError(
                "deop.pooling cal needs a trained CAL decoder, and method superpixel_clip is "
                "training-free: set deop.pooling to auto or mean, or use method deop with a "
                "deop.checkpoint"
            )
        return
    if not checkpoint and deop.proposal_source == "learned":
        raise ValueError(
            "deop.proposal_source learned needs a deop.checkpoint with a proposal head: set "
            "deop.checkpoint, or deop.proposal_source to auto, superpixels or clusters"
        )
