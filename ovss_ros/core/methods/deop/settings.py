"""The settings of DeOP (``deop.*``) and the two-stream baseline (``twostream.*``), checked
without a model (no torch here). DeOP: Han et al., ICCV 2023, CongHan0808/DeOP: 100 proposals,
masks at a quarter of the image (4 cells per 16 px patch), softmax of 100 x the cosine
similarities (``get_sim_logits``); the severed block's residual scale is ovss_ros's (see
docs/methods.md). Limits that need the loaded CLIP or a checkpoint are the methods' ``_check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.frame_budget import check_crop_batch, max_crop_batch
from ovss_ros.core.settings import Settings, setting

PROPOSAL_SOURCES = ("superpixels", "clusters", "learned")
MAX_PROPOSALS = 1000
POOLINGS = ("auto", "cal", "mean")
SEVERANCE_RESIDUAL = 0.2  # alphaShortcut of the released ResidualAttentionBlockVit, layer 11
DEOP = "DeOP (CongHan0808/DeOP)"


@dataclass(frozen=True)
class DeopSettings(Settings):
    """DeOP's settings (``method: deop``); two-stream uses its proposal settings too. All can
    change at runtime (a new checkpoint is loaded in the worker)."""

    namespace: ClassVar[str] = "deop"

    checkpoint: str = setting(
        "",
        "checkpoint file from ovss-train-deop (trained on this node's CLIP); empty = "
        "training-free DeOP (superpixel or cluster proposals, mean pooling)",
        constraints="an existing file, or empty",
        source="ovss_ros",
    )
    proposals: int = setting(
        100,
        "at most this many mask proposals per frame (deop and twostream)",
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
        "residual scale of the severed last CLIP block",
        minimum=0.0,
        maximum=1.0,
        source="ovss_ros (the released scripts run 1.0, see docs/methods.md)",
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
