"""The ROS-free segmentation core: CLIP loading, dense forward, text cache, inference."""

from ovss_ros.core.config import EngineConfig
from ovss_ros.core.engine import Segmenter
from ovss_ros.core.model_loading import ModelLoadError, load_clip
from ovss_ros.core.overlay import class_color, overlay
from ovss_ros.core.segmentation import Segmentation
from ovss_ros.core.vocabulary import ClassEntry, VocabularyError, parse_classes, slugify

__all__ = [
    "ClassEntry",
    "EngineConfig",
    "ModelLoadError",
    "Segmentation",
    "Segmenter",
    "VocabularyError",
    "class_color",
    "load_clip",
    "overlay",
    "parse_classes",
    "slugify",
]
