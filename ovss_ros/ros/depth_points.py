"""Labels in 3D as ROS messages: depth Image and CameraInfo in, PointCloud2 and MarkerArray out.

The geometry is ``ovss_ros/core/depth_geometry.py`` (no ROS); this module reads the messages
(encoding, size, ``step``, byte order) and builds the outputs:

- ``~/points``, sensor_msgs/PointCloud2 with fields x, y, z (float32, metres, the depth's optical
  frame), label (uint16: the label value; UNLABELED_POINT for pixels no class won) and confidence
  (float32, NaN when none was computed). Organised: the depth grid, every ``s``-th row and column
  with ``s`` from ``organised_stride`` (NaN points where depth is missing, ``is_dense`` false).
  Dense: one row of the valid pixels, a seeded uniform random subset when they exceed the bound.
  The layout is written with numpy structured arrays: sensor_msgs_py has no wheel on PyPI.
- ``~/objects``, visualization_msgs/MarkerArray: DELETEALL first, then per kept region a sphere
  at its centre (namespace ``centres``) and its class name as text above it (``names``); marker
  id = class_id * max_per_class + rank, so a class's largest region keeps its ids across frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from ..core.depth_geometry import (
    DepthError,
    Intrinsics,
    Region,
    back_project,
    depth_to_metres,
    organised_stride,
    sample_valid,
)
from ..core.drawing import PALETTE

UNLABELED_POINT = 65535  # the label field of a point no class won (whatever the labels' dtype)
POINT_DTYPE = np.dtype(
    {
        "names": ["x", "y", "z", "label", "confidence"],
        "formats": ["<f4", "<f4", "<f4", "<u2", "<f4"],
        "offsets": [0, 4, 8, 12, 16],
        "itemsize": 20,
    }
)
POINT_FIELDS = [
    PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1),
    PointField(name="y", offset=4, datatype=PointField.FLOAT32, count=1),
    PointField(name="z", offset=8, datatype=PointField.FLOAT32, count=1),
    PointField(name="label", offset=12, datatype=PointField.UINT16, count=1),
    PointField(name="confidence", offset=16, datatype=PointField.FLOAT32, count=1),
]
_DEPTH_DTYPES = {"16UC1": np.dtype(np.uint16), "32FC1": np.dtype(np.float32)}


def depth_image_metres(msg: Image, max_pixels: int) -> np.ndarray:
    """A depth Image (16UC1 mm or 32FC1 m, either byte order, row padding honoured) as float32
    metres ``(H, W)``, NaN where there is no measurement (0, NaN, inf, negative).

    Raises DepthError, before anything is copied, for another encoding, more than ``max_pixels``
    pixels, a zero size, a ``step`` shorter than a row, or ``data`` shorter than ``step * H``.
    """
    if msg.encoding not in _DEPTH_DTYPES:
        raise DepthError(
            f"depth encoding {msg.encoding!r} is not supported: use 16UC1 (millimetres) or "
            "32FC1 (metres)"
        )
    height, width = int(msg.height), int(msg.width)
    if height * width == 0:
        raise DepthError(f"depth image is {width}x{height}: empty")
    if height * width > max_pixels:
        raise DepthError(
            f"depth image {width}x{height} has {height * width} pixels, over {max_pixels}"
        )
    dtype = _DEPTH_DTYPES[msg.encoding].newbyteorder(">" if msg.is_bigendian else "<")
    row = width * dtype.itemsize
    if msg.step < row:
        raise DepthError(f"depth step {msg.step} is shorter than a row of {row} bytes")
    if len(msg.data) < msg.step * height:
        raise DepthError(
            f"depth data has {len(msg.data)} bytes, {msg.step} x {height} = "
            f"{msg.step * height} expected"
        )
    buffer = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * height)
    rows = buffer.reshape(height, msg.step)[:, :row]
    depth = rows.copy().view(dtype).reshape(height, width).astype(dtype.newbyteorder("="))
    return depth_to_metres(depth, msg.encoding)


def camera_intrinsics(info: CameraInfo) -> Intrinsics:
    """Intrinsics from CameraInfo's ``k`` and size. Raises DepthError for an uncalibrated or
    invalid K, and for binning or a region of interest (not supported: the image would not be
    the full calibrated one)."""
    if info.binning_x > 1 or info.binning_y > 1:
        raise DepthError(
            f"camera_info has binning {info.binning_x}x{info.binning_y}: not supported"
        )
    roi = info.roi
    if (
        roi.x_offset
        or roi.y_offset
        or (roi.width, roi.height)
        not in (
            (0, 0),
            (info.width, info.height),
        )
    ):
        raise DepthError("camera_info has a region of interest: not supported")
    return Intrinsics.from_k(info.k, info.width, info.height)


def point_cloud(
    header: Header,
    metres: np.ndarray,
    k: Intrinsics,
    labels: np.ndarray,
    confidence: np.ndarray | None = None,
    *,
    organised: bool = False,
    max_points: int = 100_000,
    seed: int = 0,
) -> PointCloud2:
    """A labelled PointCloud2 (module docstring: fields, organised and dense) from depth
    ``metres`` ``(H, W)``, ``labels`` ``(H, W)`` uint8 (255 = none) or uint16 (65535 = none) and
    ``confidence`` ``(H, W)`` float32 or None; at most ``max_points`` points.

    Raises DepthError when the arrays differ in size or max_points < 1.
    """
    height, width = metres.shape
    if labels.shape != metres.shape or (
        confidence is not None and confidence.shape != metres.shape
    ):
        raise DepthError("depth, labels and confidence must have one size")
    if organised:
        stride = organised_stride(height, width, max_points)
        grid_rows = np.arange(0, height, stride)
        grid_cols = np.arange(0, width, stride)
        rows = np.repeat(grid_rows, len(grid_cols))
        cols = np.tile(grid_cols, len(grid_rows))
        shape = (len(grid_rows), len(grid_cols))
    else:
        flat = sample_valid(np.isfinite(metres), max_points, seed)
        rows, cols = np.divmod(flat, width)
        shape = (1, len(flat))
    points = np.empty(len(rows), dtype=POINT_DTYPE)
    xyz = back_project(metres, k, rows, cols)
    points["x"], points["y"], points["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    values = labels[rows, cols].astype(np.uint32)
    values[values == np.iinfo(labels.dtype).max] = UNLABELED_POINT
    points["label"] = values
    points["confidence"] = np.nan if confidence is None else confidence[rows, cols]
    return PointCloud2(
        header=header,
        height=shape[0],
        width=shape[1],
        fields=POINT_FIELDS,
        is_bigendian=False,
        point_step=POINT_DTYPE.itemsize,
        row_step=POINT_DTYPE.itemsize * shape[1],
        data=points.tobytes(),
        is_dense=bool(np.isfinite(xyz).all()),
    )


def cloud_points(cloud: PointCloud2) -> np.ndarray:
    """The points of a cloud made by :func:`point_cloud`, as a ``(height, width)`` structured
    array of POINT_DTYPE (for consumers and tests)."""
    return np.frombuffer(bytes(cloud.data), dtype=POINT_DTYPE).reshape(cloud.height, cloud.width)


def object_markers(
    header: Header,
    regions: Sequence[Region],
    class_names: Sequence[str],
    *,
    max_per_class: int = 16,
    sphere_diameter: float = 0.1,
    colours: np.ndarray | None = None,
) -> MarkerArray:
    """DELETEALL, then a sphere (``centres``) and a text label (``names``) per region of
    ``regions`` (``class_regions`` with the same ``max_per_class``), in ``header``'s frame.

    ``colours`` ``(C, 3)`` uint8 RGB per class id (the overlay's); default: the palette in class
    id order. Text: the class name, ``sphere_diameter`` above the sphere (optical frame: -y).
    Raises ValueError for a region whose class id has no name.
    """
    unnamed = sorted({r.class_id for r in regions if not 0 <= r.class_id < len(class_names)})
    if unnamed:
        raise ValueError(f"class ids {unnamed} have no name among {len(class_names)} classes")
    palette = PALETTE if colours is None else colours
    markers = [Marker(header=header, action=Marker.DELETEALL)]
    for region in regions:
        marker_id = region.class_id * max_per_class + region.rank
        r, g, b = (float(c) / 255.0 for c in palette[region.class_id % len(palette)])
        x, y, z = region.centre
        common = dict(header=header, id=marker_id, action=Marker.ADD, lifetime=Duration())
        markers.append(
            Marker(
                ns="centres",
                type=Marker.SPHERE,
                pose=Pose(position=Point(x=x, y=y, z=z), orientation=Quaternion(w=1.0)),
                scale=Vector3(x=sphere_diameter, y=sphere_diameter, z=sphere_diameter),
                color=ColorRGBA(r=r, g=g, b=b, a=0.8),
                **common,
            )
        )
        markers.append(
            Marker(
                ns="names",
                type=Marker.TEXT_VIEW_FACING,
                pose=Pose(
                    position=Point(x=x, y=y - sphere_diameter, z=z), orientation=Quaternion(w=1.0)
                ),
                scale=Vector3(z=sphere_diameter),
                color=ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0),
                text=class_names[region.class_id],
                **common,
            )
        )
    return MarkerArray(markers=markers)
