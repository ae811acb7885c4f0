"""The ROS-free segmentation core: CLIP loading, dense forward, text cache, inference."""

from ovss_ros.core.clip.model_loading import ModelLoadError, load_clip
from ovss_ros.core.config import EngineConfig
from ovss_ros.core.overlay import ClassColours, class_color, overlay, palette
from ovss_ros.core.segmentation import Segmentation
from ovss_ros.core.segmenter import Segmenter
from ovss_ros.core.stopping import Stopped
from ovss_ros.core.vocabulary import (
    MAX_QUERIES,
    ClassEntry,
    VocabularyError,
    check_query_count,
    check_text,
    name_key,
    parse_classes,
    quoted,
    slugify,
)

__all__ = [
    "MAX_QUERIES",
    "ClassColours",
    "ClassEntry",
    "EngineConfig",
    "ModelLoadError",
    "Segmentation",
    "Segmenter",
    "Stopped",
    "VocabularyError",
    "check_query_count",
    "check_text",
    "class_color",
    "load_clip",
    "name_key",
    "overlay",
    "palette",
    "parse_classes",
    "quoted",
    "slugify",
]
