"""Labels in 3D over real DDS: the node and the lifecycle node, each in its own process, with a
synthetic depth image and camera_info beside a real photo.

The cloud's points are checked against the camera intrinsics (each point projects back onto the
pixel it came from, at that pixel's depth), its labels and confidence against the node's own
~/labels and ~/confidence of the same frame; the markers against the connected regions of the
labels (scipy, here); every refusal is counted on /diagnostics and the node goes on serving; and
nothing is computed while nobody subscribes to ~/points or ~/objects.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from depth_client import (
    CX,
    CY,
    DEPTH_STATUS,
    FX,
    FY,
    DepthClient,
    camera_info,
    cloud_array,
    depth_image,
    find_objects,
)
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.parameter import Parameter
from ros_harness import (
    TINY_NODE_PARAMETERS,
    VOC_IMAGES,
    Lifecycle,
    NodeProcess,
    OvssClient,
    image_array,
    isolate_dds,
    make_image,
    next_header,
    startup_timeout,
    status_values,
)
from scipy import ndimage
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

WIDTH, HEIGHT = 64, 48
CLASSES = ["cat", "dog", "person", "sofa"]
PARAMETERS = TINY_NODE_PARAMETERS | {"classes": CLASSES, "depth.enabled": True}
MIN_REGION = 50  # depth.min_region_pixels' default
QUEUE_SIZE = 5  # depth.queue_size's default


@pytest.fixture(scope="module", params=["node", "lifecycle"])
def served(request):
    """A running node (plain, or managed and activated) with depth enabled, and its clients."""
    isolate_dds()
    executable = "ovss_lifecycle_node" if request.param == "lifecycle" else None
    process = NodeProcess(PARAMETERS, executable=executable)
    rclpy.init()
    client = OvssClient()
    try:
        if request.param == "lifecycle":
            Lifecycle(client, "/ovss").activate()
        client.spin_until(
            lambda: process.returncode is not None or client.ready(),
            startup_timeout(),
            message=lambda: (
                f"node start-up; its output:\n{process.output()}\nthe client:\n{client.describe()}"
            ),
        )
        assert process.returncode is None, process.output()
        yield client, DepthClient(client), process
    finally:
        client.destroy()
        rclpy.shutdown()
        code = process.stop()
    assert code == 0, process.output()
    assert "Traceback" not in process.output(), process.output()
    process.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    path = sorted(VOC_IMAGES.glob("*.jpg"))[0]
    return cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), (WIDTH, HEIGHT))


def plane(metres: float = 2.0) -> np.ndarray:
    """A fronto-parallel plane with a block of missing depth (NaN: 0 in 16UC1)."""
    depth = np.full((HEIGHT, WIDTH), metres, dtype=np.float32)
    depth[10:20, 5:15] = np.nan
    return depth


def tilted() -> np.ndarray:
    """A tilted plane (metres), with missing depth in a block."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    depth = 1.0 + 0.02 * rows + 0.01 * cols
    depth[30:40, 40:60] = np.nan
    return depth.astype(np.float32)


def frame(client: OvssClient, rgb: np.ndarray, depth: np.ndarray, encoding: str = "16UC1"):
    """Colour, depth (same stamp) and camera_info of one synthetic frame."""
    header = next_header(client.node)
    return (
        depth_image(depth, encoding, header),
        make_image(rgb, "rgb8", header),
        camera_info(header, WIDTH, HEIGHT),
    )


def outputs_of(client: OvssClient, colour, topics):
    """A predicate: topic -> the message of ``colour``'s frame on each of ``topics``, or None."""

    def found():
        messages = {
            topic: find_objects(client, colour.header)
            if topic == "objects"
            else client.find(topic, colour.header)
            for topic in topics
        }
        return messages if all(m is not None for m in messages.values()) else None

    return found


def cloud_shaped(client: OvssClient, colour, shape):
    """A predicate: the newest cloud of ``colour``'s frame if it is ``shape`` (height, width)
    (the frames sent before a parameter change was put in force have the old shape)."""

    def found():
        cloud = client.find("points", colour.header)
        return cloud if cloud is not None and (cloud.height, cloud.width) == shape else None

    return found


def set_parameter(client: OvssClient, name: str, value) -> None:
    result = client.set_parameters([Parameter(name, value=value)])[0]
    assert result.successful, result.reason


def test_nothing_computed_without_subscribers(served, rgb):
    """Before anyone subscribes to ~/points or ~/objects, frames with depth are counted as
    unwatched: no pairing, no cloud, no markers; the labels are published as always."""
    client, depth_client, _ = served
    before = depth_client.wait_counters()
    depth, colour, info = frame(client, rgb, plane())
    labels = depth_client.send_until(depth, colour, outputs_of(client, colour, ["labels"]), info)
    assert labels
    client.spin_until(depth_client.grown("frames unwatched", before))
    after = depth_client.counters()
    assert after["depth received"] > before.get("depth received", 0)
    for name in ("clouds published", "objects published", "frames unpaired"):
        assert after[name] == 0, after


def test_dense_cloud_of_a_plane_matches_the_intrinsics(served, rgb):
    client, depth_client, _ = served
    depth_client.watch()
    metres = plane()
    depth, colour, info = frame(client, rgb, metres)
    found = depth_client.send_until(
        depth, colour, outputs_of(client, colour, ["points", "labels", "confidence"]), info
    )
    cloud = found["points"]
    assert (cloud.header.stamp, cloud.header.frame_id) == (
        colour.header.stamp,
        colour.header.frame_id,
    )
    points = cloud_array(cloud)
    valid = np.isfinite(metres)
    assert cloud.height == 1 and cloud.width == int(valid.sum())  # the missing block skipped
    assert cloud.is_dense
    z = points["z"][0]
    np.testing.assert_allclose(z, 2.0, rtol=0, atol=1e-6)
    # Each point projects back onto an integer pixel: u = x fx / z + cx, v = y fy / z + cy.
    u = points["x"][0] * FX / z + CX
    v = points["y"][0] * FY / z + CY
    cols, rows = np.round(u).astype(int), np.round(v).astype(int)
    np.testing.assert_allclose(u, cols, atol=1e-3)
    np.testing.assert_allclose(v, rows, atol=1e-3)
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == set(
        zip(*np.nonzero(valid), strict=True)
    )
    labels = image_array(found["labels"])
    expected = labels[rows, cols].astype(np.uint32)
    expected[expected == 255] = 65535
    np.testing.assert_array_equal(points["label"][0], expected)
    confidence = image_array(found["confidence"])
    np.testing.assert_array_equal(points["confidence"][0], confidence[rows, cols])

    # Bounded: at most depth.max_points points, still each on its pixel's ray at its depth.
    set_parameter(client, "depth.max_points", 500)
    depth, colour, info = frame(client, rgb, metres)
    # A change is put in force between two frames: the first frames may still have the old one.
    cloud = depth_client.send_until(depth, colour, cloud_shaped(client, colour, (1, 500)), info)
    points = cloud_array(cloud)
    assert points.shape == (1, 500)
    u = points["x"][0] * FX / points["z"][0] + CX
    np.testing.assert_allclose(u, np.round(u), atol=1e-3)
    set_parameter(client, "depth.max_points", 100_000)


def test_organised_cloud_of_a_tilted_plane_32fc1(served, rgb):
    client, depth_client, _ = served
    depth_client.watch()
    set_parameter(client, "depth.organised", True)
    try:
        metres = tilted()
        depth, colour, info = frame(client, rgb, metres, "32FC1")
        cloud = depth_client.send_until(
            depth, colour, cloud_shaped(client, colour, (HEIGHT, WIDTH)), info
        )
    finally:
        set_parameter(client, "depth.organised", False)
    points = cloud_array(cloud)
    assert (cloud.height, cloud.width) == (HEIGHT, WIDTH)
    assert not cloud.is_dense
    valid = np.isfinite(metres)
    assert np.isnan(points["z"][~valid]).all() and np.isnan(points["x"][~valid]).all()
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    np.testing.assert_allclose(points["z"][valid], metres[valid], rtol=1e-6)
    np.testing.assert_allclose(
        points["x"][valid], ((cols - CX) * metres / FX)[valid], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        points["y"][valid], ((rows - CY) * metres / FY)[valid], rtol=1e-5, atol=1e-6
    )


def test_objects_mark_each_class_region(served, rgb):
    client, depth_client, _ = served
    depth_client.watch()
    metres = plane()
    depth, colour, info = frame(client, rgb, metres)
    found = depth_client.send_until(
        depth, colour, outputs_of(client, colour, ["objects", "labels", "label_info"]), info
    )
    markers = found["objects"].markers
    assert markers[0].action == Marker.DELETEALL
    names = {c.class_id: c.class_name for c in found["label_info"].class_map}
    labels = image_array(found["labels"])
    expected = {}  # class value -> bounding boxes of its regions with depth, largest first
    for value in np.unique(labels):
        if value == 255:
            continue
        regions, count = ndimage.label(labels == value, structure=np.ones((3, 3)))
        boxes = []
        for index in range(1, count + 1):
            inside = regions == index
            if inside.sum() >= MIN_REGION and np.isfinite(metres[inside]).any():
                rows, cols = np.nonzero(inside)
                boxes.append((inside.sum(), cols.min(), cols.max(), rows.min(), rows.max()))
        expected[int(value)] = sorted(boxes, key=lambda b: -b[0])[:16]
    spheres = [m for m in markers if m.ns == "centres"]
    texts = {m.id: m for m in markers if m.ns == "names"}
    assert sum(len(b) for b in expected.values()) == len(spheres) == len(texts) > 0
    for sphere in spheres:
        class_id, rank = divmod(sphere.id, 16)
        assert sphere.type == Marker.SPHERE
        assert texts[sphere.id].text == names[class_id]
        _, u0, u1, v0, v1 = expected[class_id][rank]
        position = sphere.pose.position
        assert position.z == pytest.approx(2.0, abs=1e-6)
        assert (u0 - CX) * 2.0 / FX - 1e-6 <= position.x <= (u1 - CX) * 2.0 / FX + 1e-6
        assert (v0 - CY) * 2.0 / FY - 1e-6 <= position.y <= (v1 - CY) * 2.0 / FY + 1e-6


def bad_inputs(client: OvssClient, rgb: np.ndarray):
    """(counter, depth, colour, camera_info) of each kind of refusal."""
    metres = plane()
    cases = []
    depth, colour, info = frame(client, rgb, metres)
    depth.encoding = "mono16"
    cases.append(("depth wrong encoding", depth, colour, info))
    header = next_header(client.node)
    small = depth_image(np.full((HEIGHT // 2, WIDTH // 2), 1.5, np.float32), "16UC1", header)
    colour = make_image(rgb, "rgb8", header)
    cases.append(
        ("depth size mismatch", small, colour, camera_info(header, WIDTH // 2, HEIGHT // 2))
    )
    depth, colour, info = frame(client, rgb, metres)
    stamp = Time(sec=colour.header.stamp.sec - 1, nanosec=colour.header.stamp.nanosec)
    depth.header = Header(stamp=stamp, frame_id=colour.header.frame_id)  # 1 s away; slop 0
    cases.append(("frames unpaired", depth, colour, info))
    depth, colour, info = frame(client, rgb, metres)
    info.k = [0.0] * 9  # an uncalibrated camera
    cases.append(("camera_info unusable", depth, colour, info))
    depth, colour, info = frame(client, rgb, metres)
    depth.data = depth.data[: len(depth.data) // 2]  # truncated
    cases.append(("depth unreadable", depth, colour, info))
    depth, colour, info = frame(client, rgb, metres)
    depth.width, depth.height = 100_000, 100_000  # declares 10^10 pixels
    cases.append(("depth too large", depth, colour, info))
    return cases


def test_every_refusal_is_counted_and_the_node_goes_on(served, rgb):
    client, depth_client, process = served
    depth_client.watch()
    for counter, depth, colour, info in bad_inputs(client, rgb):
        before = depth_client.wait_counters()
        seen = len(client.statuses(DEPTH_STATUS))
        # Refused on arrival (its header says so): sent alone, it is the only refusal.
        alone = counter in ("depth wrong encoding", "depth too large")
        sent = None if alone else colour
        depth_client.send_until(depth, sent, depth_client.grown(counter, before), info)

        def warned(counter=counter, seen=seen):
            return [
                s
                for s in client.statuses(DEPTH_STATUS)[seen:]
                if s.level == DiagnosticStatus.WARN and f"{counter}: " in s.message
            ]

        client.spin_until(warned, message=f"a WARN status for {counter}")
        if not alone:  # the labels of a refused frame are out all the same ...
            assert depth_client.send_until(
                depth, colour, outputs_of(client, colour, ["labels"]), info
            )
        # ... and the next good frame gets its cloud.
        good_depth, good_colour, good_info = frame(client, rgb, plane())
        assert depth_client.send_until(
            good_depth, good_colour, outputs_of(client, good_colour, ["points"]), good_info
        ), counter
        assert process.returncode is None, process.output()
    assert status_values(client.statuses(DEPTH_STATUS)[-1])["depth failed"] == "0"


def test_the_depth_status_comes_in_the_nodes_one_diagnostics_array(served):
    """The node publishes one DiagnosticArray a tick: the depth status comes in it, beside the
    camera's, never in an array of its own."""
    client, _, _ = served
    client.messages["/diagnostics"].clear()
    client.spin_until(lambda: client.statuses(DEPTH_STATUS), message="a depth status")
    names = [{s.name for s in array.status} for array in client.messages["/diagnostics"]]
    assert all("ovss: image" in each for each in names if DEPTH_STATUS in each), names


def test_depth_stamped_in_the_future_is_refused_and_blocks_nothing(served, rgb):
    """More than depth.queue_size depth images stamped an hour ahead (a clock gone wrong): each
    refused and counted, never queued; queued, they would stay the newest stamps for an hour
    and push out every real depth image, so that no frame paired. The next frame's depth pairs."""
    client, depth_client, _ = served
    depth_client.watch()
    before = depth_client.wait_counters()
    for sent in range(1, QUEUE_SIZE + 2):
        ahead, colour, info = frame(client, rgb, plane())
        stamp = colour.header.stamp
        ahead.header = Header(
            stamp=Time(sec=stamp.sec + 3600, nanosec=stamp.nanosec),
            frame_id=colour.header.frame_id,
        )
        depth_client.send_until(
            ahead,
            None,
            lambda n=sent: (
                depth_client.counters()["depth received"] >= before["depth received"] + n
            ),
            info,
        )
    depth, colour, info = frame(client, rgb, plane())
    assert depth_client.send_until(depth, colour, outputs_of(client, colour, ["points"]), info)
    refused = before.get("depth unusable stamp", 0) + QUEUE_SIZE + 1
    client.wait_for_status(DEPTH_STATUS, lambda v: int(v["depth unusable stamp"]) >= refused)
    warnings = [s.message for s in client.statuses(DEPTH_STATUS)]
    assert any("depth unusable stamp: depth stamp is" in w for w in warnings), warnings[-3:]
    assert any("later than now" in w for w in warnings), warnings[-3:]
