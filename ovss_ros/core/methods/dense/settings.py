"""The dense-CLIP family's settings (NACLIP, SCLIP, ClearCLIP, MaskCLIP and FreeCP's variants):
the last-block modes, the sliding window, the positional grid, the softmax temperature and the
post-processing (SCLIP's area filter, PAMR, JBU). No torch: checked before any model loads.

Defaults follow the standard protocol of the official code (softmax of 40 x the cosine logits,
bilinear upsampling), except where camera rate decides: the whole image instead of 224/112
windows, and PAMR off (NACLIP's main results run it: 10 iterations, dilations 8 and 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.frame_budget import MAX_LONG_SIDE_LIMIT
from ovss_ros.core.settings import Settings, setting

LAST_BLOCK_MODES = (
    "naclip",
    "sclip",
    "clearclip",
    "maskclip",
    "maskclip_reduced",
    "vanilla",
    "sclip_freecp",
    "maskclip_freecp",
    "vanilla_freecp",
)
# FreeCP's ``forward_all`` (chenqi1126/FreeCP, open_clip/transformer.py) runs its SCLIP, MaskCLIP
# and vanilla bases as the attention output plus the FFN on it, without the residual stream;
# its published "SCLIP + FreeCP" numbers use that variant. Each maps to its attention.
FREECP_VARIANTS = {
    "sclip_freecp": "sclip",
    "maskclip_freecp": "maskclip",
    "vanilla_freecp": "vanilla",
}
# How the trained positional grid is resized to another patch grid (``interpolate_pos_embed``):
# ``official``: as the method's official code does it, ``exact``: bicubic to exactly the grid.
POS_INTERPOLATIONS = ("official", "exact")
# Where a refinement's patch affinity comes from (the DSLO and FreeCP papers): the last block's
# NACLIP attention, its plain key-key attention, or the mean attention of the earlier layers.
AFFINITY_SOURCES = ("naclip", "keykey", "mean")
UPSAMPLERS = ("bilinear", "jbu")
MAX_LOGIT_SCALE = 1000.0


@dataclass(frozen=True)
class DenseSettings(Settings):
    """The dense family's settings (``dense.*``); all can change between frames."""

    namespace: ClassVar[str] = "dense"

    crop: int = setting(
        0,
        "sliding-window size in pixels, a multiple of the patch size (0 = whole image)",
        minimum=0,
        maximum=MAX_LONG_SIDE_LIMIT,
        unit="pixels",
        source="ovss_ros: whole image (camera rate); the official protocol slides 224/112",
    )
    stride: int = setting(
        0,
        "sliding-window stride in pixels, at most crop (0 = crop / 2)",
        minimum=0,
        maximum=MAX_LONG_SIDE_LIMIT,
        unit="pixels",
        source="the official protocol: 112 for a 224 crop",
    )
    pos_interpolation: str = setting(
        "official",
        "positional grid at other input sizes: official = as the method's own code (DINO's "
        "'+0.1' rule of NACLIP/SCLIP/ClearCLIP), exact = bicubic to exactly the patch grid",
        choices=POS_INTERPOLATIONS,
        source="NACLIP clip/model.py interpolate_pos_encoding",
    )
    logit_scale: float = setting(
        40.0,
        "softmax temperature applied to the patch-text cosine similarities",
        minimum=0.0,
        maximum=MAX_LOGIT_SCALE,
        open_minimum=True,
        source="NACLIP configs (40); SCLIP: 65 on VOC21, 50 on PC60/COCO-Object, else 40",
    )
    area_threshold: float = setting(
        0.0,
        "SCLIP's area filter: a class labelling at most this share of the labelled pixels gives "
        "them to the next best class (0 = off; base method only, refinement none)",
        minimum=0.0,
        maximum=1.0,
        source="SCLIP area_thd (ovss_ros: off)",
    )
    pamr: bool = setting(
        False,
        "pixel-adaptive mask refinement of the final scores (10 iterations, dilations 8 and 16)",
        source="ovss_ros: off (NACLIP's main results run it: +3 mIoU, not at camera rate)",
    )
    upsample: str = setting(
        "bilinear",
        "patch scores to pixels: bilinear, or joint bilateral guided by the image",
        choices=UPSAMPLERS,
        source="NACLIP/SCLIP: bilinear",
    )

    def check(self) -> None:
        if self.stride and not self.crop:
            raise ValueError("dense.stride needs dense.crop > 0 (sliding window)")
        if self.stride > self.crop:
            raise ValueError(
                f"dense.stride {self.stride} larger than dense.crop {self.crop} would skip pixels"
            )
