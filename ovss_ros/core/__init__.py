"""The ROS-free segmentation core: CLIP loading, the method families, the text cache, inference.

Names are imported on first use (PEP 562), so that ``ovss_ros.core.config`` and the families'
``settings`` modules, which import no torch, can check settings before any model library loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ModelLoadError": "ovss_ros.core.clip.errors",
    "load_clip": "ovss_ros.core.clip.model_loading",
    "EngineConfig": "ovss_ros.core.config",
    "ClassColours": "ovss_ros.core.drawing",
    "class_color": "ovss_ros.core.drawing",
    "overlay": "ovss_ros.core.drawing",
    "palette": "ovss_ros.core.drawing",
    "Segmentation": "ovss_ros.core.segmentation",
    "Segmenter": "ovss_ros.core.segmenter",
    "Stopped": "ovss_ros.core.stopping",
    **{
        name: "ovss_ros.core.vocabulary"
        for name in (
            "MAX_QUERIES",
            "ClassEntry",
            "VocabularyError",
            "check_query_count",
            "check_text",
            "name_key",
            "parse_classes",
            "quoted",
            "slugify",
        )
    },
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
