"""Labels in 3D (ovss_ros/core/depth_geometry.py, ovss_ros/ros/depth_points.py): depth images in
both encodings to metres, the cloud of a synthetic depth plane checked point by point against
the pinhole intrinsics, missing depth skipped, every refusal with its reason, the bounds, and the
markers per connected region.

The expected coordinates are computed here from the pinhole model (x = (u - cx) z / fx,
y = (v - cy) z / fy), not by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from ros_harness import make_image
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from ovss_ros.core.depth_geometry import (
    DepthError,
    Intrinsics,
    check_sizes,
    class_regions,
    depth_to_metres,
    organised_stride,
)
from ovss_ros.ros.depth_points import (
    UNLABELED_POINT,
    camera_intrinsics,
    cloud_points,
    depth_image_metres,
    object_markers,
    point_cloud,
)

W, H = 64, 48
FX, FY, CX, CY = 500.0, 400.0, 31.5, 20.0
K = Intrinsics(FX, FY, CX, CY, W, H)
PLANE_Z = 2.0  # metres
MAX_PIXELS = 1_000_000


def header() -> Header:
    h = Header(frame_id="camera_color_optical_frame")
    h.stamp.sec, h.stamp.nanosec = 1_700_000_000, 5
    return h


def camera_info(k=(FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0), width=W, height=H) -> CameraInfo:
    return CameraInfo(header=header(), width=width, height=height, k=list(k))


def plane_16uc1(z: float = PLANE_Z) -> np.ndarray:
    return np.full((H, W), round(z * 1000), np.uint16)


def pinhole(rows: np.ndarray, cols: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.stack([(cols - CX) * z / FX, (rows - CY) * z / FY, z], axis=-1)


def xyz(points: np.ndarray) -> np.ndarray:
    return np.stack([points["x"], points["y"], points["z"]], axis=-1).astype(np.float64)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_a_plane_lands_where_the_intrinsics_put_it(encoding):
    depth = plane_16uc1() if encoding == "16UC1" else np.full((H, W), PLANE_Z, np.float32)
    metres = depth_image_metres(make_image(depth, encoding, header()), MAX_PIXELS)
    k = camera_intrinsics(camera_info())
    labels = np.zeros((H, W), np.uint8)
    cloud = point_cloud(header(), metres, k, labels, organised=True, max_points=H * W)
    assert (cloud.height, cloud.width, cloud.is_dense) == (H, W, True)
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float64)
    expected = pinhole(rows, cols, np.full((H, W), PLANE_Z))
    assert np.allclose(xyz(cloud_points(cloud)), expected, atol=1e-5, rtol=1e-6)
    # spot values by hand: the principal point's column is x = 0; pixel (0, 0) is up-left
    assert xyz(cloud_points(cloud))[0, 0] == pytest.approx([-31.5 * 2 / 500, -20 * 2 / 400, 2.0])
    dense = point_cloud(header(), metres, k, labels, organised=False, max_points=H * W)
    assert (dense.height, dense.width) == (1, H * W)
    assert np.allclose(xyz(cloud_points(dense))[0], expected.reshape(-1, 3), atol=1e-5)


def test_the_cloud_message_has_the_documented_layout_and_survives_cdr():
    metres = depth_to_metres(plane_16uc1(), "16UC1")
    labels = np.arange(H * W, dtype=np.uint16).reshape(H, W) % 7
    confidence = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    cloud = point_cloud(header(), metres, K, labels, confidence, organised=True, max_points=10**6)
    assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
        ("x", 0, PointField.FLOAT32, 1),
        ("y", 4, PointField.FLOAT32, 1),
        ("z", 8, PointField.FLOAT32, 1),
        ("label", 12, PointField.UINT16, 1),
        ("confidence", 16, PointField.FLOAT32, 1),
    ]
    assert (cloud.point_step, cloud.row_step, cloud.is_bigendian) == (20, 20 * W, False)
    assert len(cloud.data) == cloud.row_step * cloud.height
    assert cloud.header == header()
    back = deserialize_message(serialize_message(cloud), PointCloud2)
    points = cloud_points(back)
    assert np.array_equal(points["label"], labels)
    assert np.array_equal(points["confidence"], confidence)


def test_missing_depth_is_skipped_in_dense_and_nan_in_organised_clouds():
    depth = np.full((H, W), PLANE_Z, np.float32)
    missing = {(0, 0): 0.0, (5, 7): np.nan, (10, 3): np.inf, (11, 3): -np.inf, (12, 40): -1.0}
    for (row, col), value in missing.items():
        depth[row, col] = value
    depth[30:40, 10:20] = 0.0  # a hole of 100 pixels
    metres = depth_to_metres(depth, "32FC1")
    labels = np.zeros((H, W), np.uint8)
    dense = point_cloud(header(), metres, K, labels, max_points=10**6)
    expected_count = H * W - len(missing) - 100
    assert (dense.height, dense.width, dense.is_dense) == (1, expected_count, True)
    points = xyz(cloud_points(dense))[0]
    assert np.isfinite(points).all() and np.allclose(points[:, 2], PLANE_Z)
    # the pixels behind the points, recovered from x and y, are exactly the valid ones
    cols = np.rint(points[:, 0] * FX / PLANE_Z + CX).astype(int)
    rows = np.rint(points[:, 1] * FY / PLANE_Z + CY).astype(int)
    assert not any((r, c) in missing for r, c in zip(rows, cols, strict=True))
    assert not ((rows >= 30) & (rows < 40) & (cols >= 10) & (cols < 20)).any()
    organised = point_cloud(header(), metres, K, labels, organised=True, max_points=10**6)
    grid = xyz(cloud_points(organised))
    assert organised.is_dense is False
    assert np.isnan(grid[30:40, 10:20]).all() and np.isnan(grid[5, 7]).all()
    assert np.isfinite(grid).all(axis=-1).sum() == expected_count
    # 16UC1: 0 is "no measurement"
    millimetres = plane_16uc1()
    millimetres[1, 1] = 0
    assert np.isnan(depth_to_metres(millimetres, "16UC1")[1, 1])


def test_byte_order_and_row_padding_are_honoured():
    depth = (np.arange(H * W, dtype=np.uint16).reshape(H, W) % 5000) + 1
    expected = depth.astype(np.float32) / 1000
    big = make_image(depth.astype(">u2"), "16UC1", header())
    big.is_bigendian = 1
    assert np.allclose(depth_image_metres(big, MAX_PIXELS), expected)
    padded = np.zeros((H, W + 3), np.uint16)
    padded[:, :W] = depth
    message = make_image(padded, "16UC1", header())
    message.width = W  # step keeps the 3 padding columns
    assert message.step == (W + 3) * 2
    assert np.allclose(depth_image_metres(message, MAX_PIXELS), expected)
    floats = make_image(np.full((H, W), 1.25, ">f4"), "32FC1", header())
    floats.is_bigendian = 1
    assert np.allclose(depth_image_metres(floats, MAX_PIXELS), 1.25)


def refusal(function, *args, **kwargs) -> str:
    with pytest.raises(DepthError) as caught:
        function(*args, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize("encoding", ["mono16", "16SC1", "32FC3", "mono8", "rgb8", ""])
def test_other_encodings_are_refused_with_the_supported_ones(encoding):
    message = make_image(plane_16uc1(), "16UC1", header())
    message.encoding = encoding
    reason = refusal(depth_image_metres, message, MAX_PIXELS)
    assert repr(encoding) in reason and "16UC1" in reason and "32FC1" in reason
    reason = refusal(depth_to_metres, plane_16uc1(), encoding)
    assert repr(encoding) in reason


def test_malformed_depth_messages_are_refused_before_reading():
    good = make_image(plane_16uc1(), "16UC1", header())
    short = make_image(plane_16uc1(), "16UC1", header())
    short.data = bytes(good.data)[:-1]
    assert "bytes" in refusal(depth_image_metres, short, MAX_PIXELS)
    narrow = make_image(plane_16uc1(), "16UC1", header())
    narrow.step = W * 2 - 1
    assert "step" in refusal(depth_image_metres, narrow, MAX_PIXELS)
    empty = make_image(np.zeros((0, 0), np.uint16), "16UC1", header())
    assert "empty" in refusal(depth_image_metres, empty, MAX_PIXELS)
    assert f"over {H * W - 1}" in refusal(depth_image_metres, good, H * W - 1)
    huge = make_image(np.zeros((1, 1), np.uint16), "16UC1", header())
    huge.width, huge.height = 100_000, 100_000  # declared, with 2 bytes of data
    assert "pixels, over" in refusal(depth_image_metres, huge, MAX_PIXELS)
    reason = refusal(depth_to_metres, np.zeros((H, W), np.float32), "16UC1")
    assert "uint16" in reason and "float32" in reason


def test_depth_of_another_size_than_the_colour_image_is_refused():
    reason = refusal(check_sizes, (24, 32), (H, W), K)
    assert "32x24" in reason and f"{W}x{H}" in reason and "registered" in reason
    reason = refusal(check_sizes, (H, W), (H, W), Intrinsics(FX, FY, CX, CY, 640, 480))
    assert "640x480" in reason and f"{W}x{H}" in reason
    check_sizes((H, W), (H, W), K)
    check_sizes((H, W), (H, W), Intrinsics(FX, FY, CX, CY))  # no size given: not checked
    metres = depth_to_metres(plane_16uc1(), "16UC1")
    assert "one size" in refusal(point_cloud, header(), metres, K, np.zeros((H, W - 1), np.uint8))
    assert "differ" in refusal(class_regions, np.zeros((H, W - 1), np.uint8), metres, K)


@pytest.mark.parametrize(
    ("k", "words"),
    [
        ((0.0,) * 9, "not calibrated"),
        ((FX, 0, CX, 0, FY, CY, 0, 0), "8 numbers"),
        ((0.0, 0, CX, 0, FY, CY, 0, 0, 1), "must be > 0"),
        ((FX, 0, CX, 0, -FY, CY, 0, 0, 1), "must be > 0"),
        ((FX, 0, np.nan, 0, FY, CY, 0, 0, 1), "not finite"),
    ],
)
def test_unusable_intrinsics_are_refused(k, words):
    assert words in refusal(Intrinsics.from_k, k)


def test_camera_info_with_binning_or_roi_is_refused_and_a_plain_one_read():
    info = camera_info()
    assert camera_intrinsics(info) == K
    binned = camera_info()
    binned.binning_x = 2
    assert "binning" in refusal(camera_intrinsics, binned)
    cropped = camera_info()
    cropped.roi.x_offset, cropped.roi.width, cropped.roi.height = 4, 32, 24
    assert "region of interest" in refusal(camera_intrinsics, cropped)
    assert "not calibrated" in refusal(camera_intrinsics, camera_info(k=(0.0,) * 9))


def test_organised_clouds_keep_a_strided_grid_within_the_bound():
    assert organised_stride(H, W, H * W) == 1
    assert organised_stride(H, W, 100) == 6  # 8 x 11 = 88 <= 100; stride 5: 10 x 13 = 130
    for bound in (1, 7, 100, 500, 3071):
        stride = organised_stride(H, W, bound)
        assert -(-H // stride) * -(-W // stride) <= bound
        assert stride == 1 or -(-H // (stride - 1)) * -(-W // (stride - 1)) > bound
    metres = depth_to_metres(plane_16uc1(), "16UC1")
    cloud = point_cloud(
        header(), metres, K, np.zeros((H, W), np.uint8), organised=True, max_points=100
    )
    assert (cloud.height, cloud.width) == (8, 11)
    rows, cols = np.mgrid[0:H:6, 0:W:6].astype(np.float64)
    assert np.allclose(xyz(cloud_points(cloud)), pinhole(rows, cols, np.full(rows.shape, 2.0)))
    assert "at least 1" in refusal(organised_stride, H, W, 0)


def test_dense_clouds_draw_a_seeded_subset_of_valid_pixels():
    depth = np.full((H, W), PLANE_Z, np.float32)
    depth[:, :8] = np.nan
    metres = depth_to_metres(depth, "32FC1")
    labels = np.zeros((H, W), np.uint8)

    def pixels(seed: int) -> set[tuple[int, int]]:
        cloud = point_cloud(header(), metres, K, labels, max_points=100, seed=seed)
        assert (cloud.height, cloud.width) == (1, 100)
        points = xyz(cloud_points(cloud))[0]
        cols = np.rint(points[:, 0] * FX / PLANE_Z + CX).astype(int)
        rows = np.rint(points[:, 1] * FY / PLANE_Z + CY).astype(int)
        return set(zip(rows.tolist(), cols.tolist(), strict=True))

    first = pixels(0)
    assert len(first) == 100 and all(col >= 8 for _, col in first)
    assert pixels(0) == first
    assert pixels(1) != first
    assert "at least 1" in refusal(point_cloud, header(), metres, K, labels, max_points=0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_points_carry_their_pixel_label_and_confidence(dtype):
    labels = np.zeros((H, W), dtype)
    labels[:, W // 2 :] = 3
    labels[0, :] = np.iinfo(dtype).max  # unlabeled row
    confidence = np.random.default_rng(1).random((H, W), dtype=np.float32)
    metres = depth_to_metres(plane_16uc1(), "16UC1")
    points = cloud_points(
        point_cloud(header(), metres, K, labels, confidence, organised=True, max_points=10**6)
    )
    assert (points["label"][0] == UNLABELED_POINT).all()
    assert (points["label"][1:, : W // 2] == 0).all() and (
        points["label"][1:, W // 2 :] == 3
    ).all()
    assert np.array_equal(points["confidence"], confidence)
    without = cloud_points(point_cloud(header(), metres, K, labels, None, max_points=10**6))
    assert np.isnan(without["confidence"]).all()


def scene() -> np.ndarray:
    """Class 0: two squares (12x12 and 8x8); class 2: one 10x6 block and a diagonal neighbour
    (8-connected: one region); class 1: a 3x3 speck under min_pixels."""
    labels = np.full((H, W), 255, np.uint8)
    labels[2:14, 2:14] = 0
    labels[30:38, 40:48] = 0
    labels[20:26, 20:30] = 2
    labels[26, 30] = 2  # touches (25, 29) at a corner
    labels[40:43, 5:8] = 1
    return labels


def test_each_connected_region_of_a_class_gets_a_sphere_and_a_name():
    metres = depth_to_metres(plane_16uc1(), "16UC1")
    regions = class_regions(scene(), metres, K, min_pixels=20, max_per_class=4)
    assert [(r.class_id, r.rank, r.pixels) for r in regions] == [
        (0, 0, 144),
        (0, 1, 64),
        (2, 0, 61),
    ]
    # the centre of the 12x12 square: pixel (7.5, 7.5) back-projected onto the plane
    assert regions[0].centre == pytest.approx(tuple(pinhole(7.5, 7.5, PLANE_Z)), abs=1e-5)
    assert regions[1].centre == pytest.approx(tuple(pinhole(33.5, 43.5, PLANE_Z)), abs=1e-5)
    names = ["cup", "speck", "chair"]
    markers = object_markers(
        header(), regions, names, max_per_class=4, sphere_diameter=0.2
    ).markers
    assert markers[0].action == Marker.DELETEALL
    assert len(markers) == 1 + 2 * len(regions)
    spheres = [m for m in markers if m.ns == "centres"]
    texts = [m for m in markers if m.ns == "names"]
    assert [m.id for m in spheres] == [m.id for m in texts] == [0, 1, 8]  # class * 4 + rank
    assert all(m.type == Marker.SPHERE and m.scale.x == pytest.approx(0.2) for m in spheres)
    assert [m.text for m in texts] == ["cup", "cup", "chair"]
    for sphere, text, region in zip(spheres, texts, regions, strict=True):
        position = sphere.pose.position
        assert (position.x, position.y, position.z) == pytest.approx(region.centre, abs=1e-6)
        assert text.pose.position.y == pytest.approx(position.y - 0.2)
        assert sphere.header == header() and sphere.action == Marker.ADD
    assert spheres[0].color != spheres[2].color  # one colour per class
    assert spheres[0].color == spheres[1].color


def test_a_region_centre_ignores_the_background_depth_its_edge_takes_in():
    """The per-axis median: a mask that spills over an object's edge onto a far wall for a
    quarter of its pixels keeps its centre on the object (the mean would move 1.25 m back)."""
    labels = np.full((H, W), 255, np.uint8)
    labels[10:30, 10:30] = 0
    depth = np.full((H, W), PLANE_Z, np.float32)
    depth[10:15, 10:30] = 7.0  # the top quarter of the mask sees the wall behind
    (region,) = class_regions(labels, depth_to_metres(depth, "32FC1"), K, min_pixels=1)
    assert region.centre[2] == pytest.approx(PLANE_Z)


def test_region_bounds_ids_and_missing_depth():
    labels = np.full((H, W), 255, np.uint8)
    for index in range(5):  # five 4x4 squares of class 1, sizes equal: first met ranks first
        labels[2 + index * 8 : 6 + index * 8, 2:6] = 1
    depth = np.full((H, W), PLANE_Z, np.float32)
    metres = depth_to_metres(depth, "32FC1")
    regions = class_regions(labels, metres, K, min_pixels=16, max_per_class=3)
    assert [(r.class_id, r.rank) for r in regions] == [(1, 0), (1, 1), (1, 2)]
    assert regions[0].centre[1] < regions[1].centre[1] < regions[2].centre[1]  # top first
    assert class_regions(labels, metres, K, min_pixels=17) == []
    depth[2:6, 2:6] = np.nan  # the first square has no depth: skipped, the next takes rank 0
    regions = class_regions(labels, depth_to_metres(depth, "32FC1"), K, min_pixels=16)
    assert len(regions) == 4 and regions[0].centre[1] == pytest.approx((11.5 - CY) * 2 / FY)
    assert "at least 1" in refusal(class_regions, labels, metres, K, min_pixels=0)
    with pytest.raises(ValueError, match="no name"):
        object_markers(header(), regions, [], max_per_class=16)


def test_marker_ids_stay_with_the_class_when_regions_move():
    metres = depth_to_metres(plane_16uc1(), "16UC1")
    before = class_regions(scene(), metres, K, min_pixels=20)
    after = class_regions(np.roll(scene(), (3, 5), axis=(0, 1)), metres, K, min_pixels=20)
    names = ["cup", "speck", "chair"]
    ids = [
        [(m.ns, m.id, m.text) for m in object_markers(header(), r, names).markers[1:]]
        for r in (before, after)
    ]
    assert ids[0] == ids[1]
    assert before[0].centre != after[0].centre
