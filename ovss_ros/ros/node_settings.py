"""The node's own settings: what the ROS adapter reads besides the engine's (``EngineConfig``).

Defined once, as the engine's are (``core.settings``): a ``Settings`` whose fields carry the
default, description, range or choices and whether they change at runtime. The node's parameter
table (``parameter_table``) is ``core.config.SCHEMA`` plus these; names are top level (no
namespace). No rclpy here: the launch plan and ``--help`` read the table without ROS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ovss_ros.core.settings import Settings, parameters, setting
from ovss_ros.ros.depth_settings import DepthSettings
from ovss_ros.ros.encoded_images import DEFAULT_MAX_INPUT_PIXELS

IMAGE_TRANSPORTS = ("raw", "compressed")
DEFAULT_CLASSES = ("person", "chair", "table", "floor", "wall", "door")


@dataclass(frozen=True)
class NodeSettings(Settings):
    """The node-only parameters: the cameras and their transport, the vocabulary, what is
    published, and the input limits (``image_conversion``, ``frames``)."""

    namespace: ClassVar[str] = ""

    image_transport: str = setting(
        "raw",
        "subscribe to 'image' (raw) or 'image/compressed' (compressed)",
        runtime=False,
        choices=IMAGE_TRANSPORTS,
        source="ovss_ros",
    )
    cameras: tuple[str, ...] = setting(
        (),
        "camera names: camera 'front' reads front/image and front/camera_info and publishes "
        "~/front/labels etc.; one model segments all (frames ready together share a forward "
        "pass); empty = one camera: image -> ~/labels",
        runtime=False,
        constraints="unique ROS name tokens (letters, digits, '_'; not starting with a digit)",
        source="ovss_ros",
    )
    classes: tuple[str, ...] = setting(
        DEFAULT_CLASSES,
        "vocabulary: one entry per class, synonyms after ';' (the first names the class), "
        "descriptions after '|'; label value = index in this list",
        constraints="non-empty, unique names, at most 1000 entries of 200 characters",
        source="ovss_ros (an indoor example)",
    )
    publish_masks: bool = setting(
        True,
        "publish ~/masks/<class> (mono8 0/255), computed only while someone subscribes",
        source="ovss_ros",
    )
    publish_overlay: bool = setting(
        True, "publish ~/overlay (rgb8), computed only while someone subscribes", source="ovss_ros"
    )
    publish_confidence: bool = setting(
        True,
        "publish ~/confidence (32FC1), computed only while someone subscribes",
        source="ovss_ros",
    )
    overlay_alpha: float = setting(
        0.5,
        "weight of the class colour in ~/overlay",
        minimum=0.0,
        maximum=1.0,
        source="ovss_ros",
    )
    overlay_legend: bool = setting(
        True,
        "draw a legend on ~/overlay, top left: each class present in the frame with its colour",
        source="ovss_ros",
    )
    max_input_pixels: int = setting(
        DEFAULT_MAX_INPUT_PIXELS,
        "frames with more pixels (width x height; for compressed frames the size the data "
        "declares) are rejected before they are decoded or converted, and counted as rejected",
        minimum=1,
        maximum=2**31 - 1,
        unit="pixels",
        source="ovss_ros (a 40 MP frame, above any common camera)",
    )
    max_frame_age: float = setting(
        0.0,
        "drop frames whose header stamp is older than this many seconds (0 = keep all)",
        minimum=0.0,
        maximum=3600.0,
        unit="s",
        source="ovss_ros",
    )


NODE_SCHEMA = parameters(NodeSettings, DepthSettings)  # depth.*: depth_settings
