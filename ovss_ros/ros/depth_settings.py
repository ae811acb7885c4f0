"""The node's depth settings (``depth.*`` parameters): labels in 3D from a registered depth image.

Defined once, as the node's other settings (``node_settings``); no rclpy here. ``depth.enabled``
is chosen at start-up (it creates the depth inputs and the ``~/points`` and ``~/objects``
outputs); the others change at runtime and take effect on the next frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ovss_ros.core.settings import Settings, parameters, setting


@dataclass(frozen=True)
class DepthSettings(Settings):
    """Depth input, colour/depth pairing and the 3D outputs (``depth_outputs``)."""

    namespace: ClassVar[str] = "depth"

    enabled: bool = setting(
        False,
        "subscribe to depth/image (16UC1 mm or 32FC1 m, registered to the colour image) and "
        "depth/camera_info, and publish ~/points and ~/objects (each computed only while "
        "someone subscribes)",
        runtime=False,
        source="ovss_ros",
    )
    slop: float = setting(
        0.0,
        "pair a colour frame with the depth image whose stamp is closest to its own, at most "
        "this many seconds apart (0 = equal stamps only, as message_filters ExactTime)",
        minimum=0.0,
        maximum=10.0,
        unit="s",
        source="ovss_ros (message_filters ApproximateTime's slop)",
    )
    queue_size: int = setting(
        5,
        "depth images kept while they wait for their colour frame (newest stamps kept)",
        minimum=1,
        maximum=100,
        runtime=False,
        source="ovss_ros (message_filters' default queue size)",
    )
    organised: bool = setting(
        False,
        "~/points as an organised cloud (the depth grid, every s-th row and column within "
        "max_points, NaN where depth is missing) instead of a dense list of valid points",
        source="ovss_ros",
    )
    max_points: int = setting(
        100_000,
        "at most this many points per ~/points cloud (dense: a seeded uniform sample of the "
        "valid pixels; organised: a coarser grid)",
        minimum=1,
        maximum=10_000_000,
        unit="points",
        source="ovss_ros",
    )
    min_region_pixels: int = setting(
        50,
        "~/objects: connected regions of a class smaller than this are not marked",
        minimum=1,
        maximum=2**31 - 1,
        unit="pixels",
        source="ovss_ros",
    )
    max_regions_per_class: int = setting(
        16,
        "~/objects: at most this many regions per class (the largest), each a sphere and a name",
        minimum=1,
        maximum=1000,
        source="ovss_ros",
    )


DEPTH_SCHEMA = parameters(DepthSettings)


def depth_settings(values: Mapping[str, Any]) -> DepthSettings:
    """The depth settings among the node's parameter values (dotted names ``depth.*``; an
    integer given for a float is that float). Values are checked by the parameters' table."""
    fields = {}
    for definition in DEPTH_SCHEMA:
        value = values[definition.name]
        fields[definition.field] = float(value) if definition.type is float else value
    return DepthSettings(**fields)
