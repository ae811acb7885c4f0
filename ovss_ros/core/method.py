"""The method registry: which family each ``method`` name belongs to.

The dense family (``methods/dense``: ``DenseMethod``) runs the last-block modes, NACLIP,
SCLIP, ClearCLIP, MaskCLIP (and its reduced form), vanilla CLIP and FreeCP's variants; PnP-OVSS
(``methods/pnp_ovss``), DeOP and the two-stream baseline (``methods/deop``) each bring their own
pipeline (``method_pipelines.Pipeline``). Every family offers the same calls to the Segmenter:
``segment_many(images)``, ``batch_groups(images)``, ``check(config, classes)``, ``describe()``;
preparing a change is the family's own (``DenseMethod.prepare`` / ``commit``,
``build_pipeline``).
"""

from __future__ import annotations

from ovss_ros.core.config import PIPELINE_METHODS
from ovss_ros.core.methods.dense.forward import LAST_BLOCK_MODES

FAMILIES: dict[str, str] = {
    **{name: "dense" for name in LAST_BLOCK_MODES},
    **{name: name if name != "twostream" else "deop" for name in PIPELINE_METHODS},
}


def family(method: str) -> str:
    """The family folder under ``core/methods`` that runs ``method``; KeyError if unknown."""
    return FAMILIES[method]


def builds_pipeline(method: str) -> bool:
    """Whether ``method`` runs as a ``Pipeline`` (pnp_ovss, deop, twostream), not the dense
    family's ``DenseMethod``."""
    return family(method) != "dense"
