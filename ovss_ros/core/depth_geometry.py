"""Labels in 3D without ROS: depth in metres, pinhole back-projection, bounded point sampling and
per-class connected regions with a 3D centre.

The ROS side (``ovss_ros/ros/depth_points.py``) turns sensor_msgs/Image and CameraInfo into the
arrays and intrinsics used here, and the results into PointCloud2 and MarkerArray.

Conventions (REP 103/104 optical frame, as depth_image_proc's point_cloud_xyz): for pixel column
``u`` and row ``v`` with depth ``z`` in metres, ``x = (u - cx) z / fx``, ``y = (v - cy) z / fy``;
x right, y down, z forward. Depth is registered to the colour image: one depth pixel per label
pixel, the same intrinsics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Depth encodings (REP 118): 16-bit unsigned millimetres, 32-bit float metres.
DEPTH_ENCODINGS = {"16UC1": 0.001, "32FC1": 1.0}  # encoding -> metres per unit


class DepthError(ValueError):
    """Depth or intrinsics that cannot be used; ``str(error)`` is the reason shown to the user."""


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels and the image size they belong to.

    ``fx, fy`` focal lengths, ``cx, cy`` principal point (pixels); ``width, height`` the image
    size (0 when the source does not say). Source: sensor_msgs/CameraInfo ``k`` (row-major 3x3,
    ``[fx 0 cx; 0 fy cy; 0 0 1]``).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int = 0
    height: int = 0

    @classmethod
    def from_k(cls, k: Sequence[float], width: int = 0, height: int = 0) -> Intrinsics:
        """From CameraInfo's row-major ``k`` (9 numbers). Raises DepthError for a K of another
        length, an uncalibrated camera (all zeros, as CameraInfo sends before calibration), a
        focal length that is not positive or a value that is not finite."""
        values = [float(v) for v in k]
        if len(values) != 9:
            raise DepthError(f"camera matrix K has {len(values)} numbers, expected 9 (3x3)")
        if not all(math.isfinite(v) for v in values):
            raise DepthError(f"camera matrix K has a value that is not finite: {values}")
        if not any(values):
            raise DepthError("camera matrix K is all zeros: the camera is not calibrated")
        fx, fy, cx, cy = values[0], values[4], values[2], values[5]
        if fx <= 0 or fy <= 0:
            raise DepthError(f"camera matrix K has fx={fx}, fy={fy}: focal lengths must be > 0")
        return cls(fx, fy, cx, cy, int(width), int(height))


def depth_to_metres(depth: np.ndarray, encoding: str) -> np.ndarray:
    """Depth ``(H, W)`` in the encoding's unit -> float32 metres ``(H, W)``, NaN where there is
    no measurement: 0 (what drivers send for none), NaN, +-inf and negative values.

    ``16UC1``: millimetres (uint16); ``32FC1``: metres (float32). Raises DepthError for another
    encoding, or an array of the wrong dimensions or dtype for its encoding.
    """
    if encoding not in DEPTH_ENCODINGS:
        raise DepthError(
            f"depth encoding {encoding!r} is not supported: use 16UC1 (millimetres) or 32FC1 "
            "(metres)"
        )
    expected = np.uint16 if encoding == "16UC1" else np.float32
    if depth.ndim != 2 or depth.dtype != expected:
        raise DepthError(
            f"{encoding} depth must be a 2-D {np.dtype(expected).name} array, "
            f"got {depth.ndim}-D {depth.dtype}"
        )
    metres = depth.astype(np.float32) * np.float32(DEPTH_ENCODINGS[encoding])
    metres[~np.isfinite(metres) | (metres <= 0)] = np.nan
    return metres


def check_sizes(
    depth_shape: tuple[int, ...], labels_shape: tuple[int, ...], k: Intrinsics
) -> None:
    """Refuse a depth image that is not registered to the labels (another size), or intrinsics
    for another image size (when they give one). Raises DepthError with both sizes."""
    (dh, dw), (lh, lw) = depth_shape[:2], labels_shape[:2]
    if (dh, dw) != (lh, lw):
        raise DepthError(
            f"depth is {dw}x{dh} but the colour image is {lw}x{lh}: give depth registered to "
            "the colour camera (the same size, e.g. a driver's aligned depth)"
        )
    if (k.width, k.height) != (0, 0) and (k.width, k.height) != (dw, dh):
        raise DepthError(
            f"camera_info is for {k.width}x{k.height} but depth is {dw}x{dh}: give the "
            "camera_info of the registered depth (the colour camera's)"
        )


def organised_stride(height: int, width: int, max_points: int) -> int:
    """The smallest step ``s`` (every s-th row and column) with at most ``max_points`` grid
    points: ``ceil(H/s) * ceil(W/s) <= max_points``. Raises DepthError when max_points < 1."""
    if max_points < 1:
        raise DepthError(f"max_points must be at least 1, got {max_points}")
    stride = max(1, math.ceil(math.sqrt(height * width / max_points)))
    while math.ceil(height / stride) * math.ceil(width / stride) > max_points:
        stride += 1
    return stride


def sample_valid(valid: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Flat indices (row-major, increasing) of the True pixels of ``valid`` ``(H, W)``; when
    there are more than ``max_points``, a uniform random subset of ``max_points`` of them drawn
    without replacement by ``numpy.random.default_rng(seed)`` (the same frame and seed give the
    same points). Raises DepthError when max_points < 1."""
    if max_points < 1:
        raise DepthError(f"max_points must be at least 1, got {max_points}")
    indices = np.flatnonzero(valid)
    if indices.size > max_points:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(indices, size=max_points, replace=False))
    return indices


def back_project(
    metres: np.ndarray, k: Intrinsics, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """3D points ``(N, 3)`` float32 (x, y, z in metres, optical frame) of pixels ``(rows[i],
    cols[i])`` with depth ``metres`` ``(H, W)``; NaN depth gives NaN points."""
    z = metres[rows, cols].astype(np.float64)
    x = (cols.astype(np.float64) - k.cx) * z / k.fx
    y = (rows.astype(np.float64) - k.cy) * z / k.fy
    return np.stack([x, y, z], axis=1).astype(np.float32)


@dataclass(frozen=True)
class Region:
    """One connected region of one class: ``class_id`` (label value), ``rank`` (0 = the class's
    largest region in this frame), ``pixels`` (its size in label pixels), ``valid`` (pixels
    with depth), ``centre`` (x, y, z metres: the per-axis median of the region's 3D points,
    robust to the background depth a mask edge takes in)."""

    class_id: int
    rank: int
    pixels: int
    valid: int
    centre: tuple[float, float, float]


def class_regions(
    labels: np.ndarray,
    metres: np.ndarray,
    k: Intrinsics,
    *,
    min_pixels: int = 50,
    max_per_class: int = 16,
    unlabeled: int | None = None,
) -> list[Region]:
    """The connected regions (8-connected, ``scipy.ndimage.label``) of each class in ``labels``
    ``(H, W)`` integer, with their 3D centre from ``metres`` ``(H, W)`` (same size).

    Kept: regions of at least ``min_pixels`` label pixels with at least one valid depth pixel,
    the ``max_per_class`` largest of each class (ties: the one met first, row-major). The
    ``unlabeled`` value (default: the dtype's maximum, 255 or 65535) is no class. Ordered by
    class_id, then rank. Raises DepthError for sizes that differ or bounds below 1.
    """
    from scipy import ndimage

    if labels.shape != metres.shape:
        raise DepthError(f"labels {labels.shape} and depth {metres.shape} differ in size")
    if min_pixels < 1 or max_per_class < 1:
        raise DepthError(f"min_pixels ({min_pixels}) and max_per_class must be at least 1")
    if unlabeled is None:
        unlabeled = int(np.iinfo(labels.dtype).max)
    structure = np.ones((3, 3), dtype=bool)
    regions: list[Region] = []
    for class_id in np.unique(labels):
        if int(class_id) == unlabeled:
            continue
        components, count = ndimage.label(labels == class_id, structure=structure)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        boxes = ndimage.find_objects(components)  # each region's bounding slices
        kept = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_pixels]
        rank = 0
        for component in kept:
            if rank == max_per_class:
                break
            box = boxes[component - 1]
            rows, cols = np.nonzero(components[box] == component)
            rows, cols = rows + box[0].start, cols + box[1].start
            points = back_project(metres, k, rows, cols)
            points = points[np.isfinite(points[:, 2])]
            if len(points) == 0:
                continue
            centre = tuple(float(c) for c in np.median(points, axis=0))
            regions.append(Region(int(class_id), rank, int(rows.size), len(points), centre))
            rank += 1
    return regions
