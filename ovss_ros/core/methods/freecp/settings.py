"""FreeCP's settings (``freecp.*``): the class purification thresholds. No torch here.

Defaults: the official class defaults (``rp_thres`` 0.15 and the ambiguity threshold 0.7 of
chenqi1126/FreeCP's ``freecp_segmentor.py``; its per-benchmark configs are
``freecp.DATASET_THRESHOLDS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.settings import Settings, setting


@dataclass(frozen=True)
class FreecpSettings(Settings):
    """FreeCP's settings (``refinement: freecp``); both can change at runtime."""

    namespace: ClassVar[str] = "freecp"

    redundancy: float = setting(
        0.15,
        "keep a class only if its purification score is above this",
        minimum=0.0,
        maximum=1.0,
        source="FreeCP freecp_segmentor.py rp_thres",
    )
    ambiguity: float = setting(
        0.7,
        "soft IoU above which overlapping classes are resolved with image crops",
        minimum=0.0,
        maximum=1.0,
        source="FreeCP configs (VOC20, Context, ADE: 0.7)",
    )
