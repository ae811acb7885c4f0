"""FreeCP's settings (``freecp.*``): the class purification thresholds. No torch here.

Defaults: the official class defaults (``rp_thres`` 0.15 and the ambiguity threshold 0.7 of
chenqi1126/FreeCP's ``freecp_segmentor.py``; its per-benchmark configs are
``DATASET_THRESHOLDS``, which ovss-eval's FreeCP protocol uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.settings import Settings, setting

# (redundancy threshold T_rp, ambiguity threshold T_ap) per benchmark, read from FreeCP's
# released configs/cfg_*.py (commit 0ed5b4a). To be checked against the paper before they are
# quoted; a robot's vocabulary is closest to the object sets (VOC / COCO-Object).
DATASET_THRESHOLDS: dict[str, tuple[float, float]] = {
    "voc21": (0.15, 0.8),
    "voc20": (0.15, 0.7),
    "context60": (0.10, 0.7),
    "context59": (0.10, 0.7),
    "coco_object": (0.15, 0.8),
    "coco_stuff": (0.05, 0.7),
    "cityscapes": (0.10, 0.8),
    "ade20k": (0.05, 0.7),
}


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

    def summary(self) -> str:
        """For logs: ``freecp (redundancy 0.15, ambiguity 0.7)``."""
        return f"freecp (redundancy {self.redundancy:g}, ambiguity {self.ambiguity:g})"
