"""The test's side of the node's 3D outputs: depth and camera_info publishers, ~/points and
~/objects subscriptions, messages built by hand (not by the code under test), and waits on
events (a message with a frame's header, a diagnostics counter that grows)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import rclpy
from ros_harness import EVENT_TIMEOUT_S, OvssClient, make_image, status_values
from sensor_msgs.msg import CameraInfo, PointCloud2
from visualization_msgs.msg import MarkerArray

DEPTH_STATUS = "ovss: image depth"
# Intrinsics of the synthetic camera: focal lengths and principal point in pixels.
FX, FY, CX, CY = 50.0, 55.0, 31.5, 23.0


class DepthClient:
    """Publishes depth/image and depth/camera_info beside an OvssClient's image (``camera``:
    ``front/depth/image`` beside ``front/image``; "" = the single camera)."""

    def __init__(self, client: OvssClient, camera: str = "") -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        self.client = client
        self.camera = camera
        self.prefix = f"{camera}/" if camera else ""
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.depth_pub = client.node.create_publisher(Image, f"{self.prefix}depth/image", qos)
        self.info_pub = client.node.create_publisher(
            CameraInfo, f"{self.prefix}depth/camera_info", qos
        )
        self.status = f"ovss: {camera or 'image'} depth"

    @property
    def image_pub(self) -> Any:
        """The colour image's publisher (the client's, which ``ready`` may renew)."""
        return self.client.image_pubs[self.camera]

    def watch(self) -> None:
        """Subscribe to ~/points and ~/objects (the node computes them from now on)."""
        self.client.subscribe(self.client.topic(f"{self.prefix}points"), PointCloud2)
        self.client.subscribe(self.client.topic(f"{self.prefix}objects"), MarkerArray)

    def publish_pair(self, depth: Any, colour: Any, info: CameraInfo | None = None) -> None:
        if info is not None:
            self.info_pub.publish(info)
        self.depth_pub.publish(depth)
        if colour is not None:  # None: depth alone
            self.image_pub.publish(colour)

    def send_until(
        self,
        depth: Any,
        colour: Any,
        done: Any,
        info: CameraInfo | None = None,
        timeout: float = EVENT_TIMEOUT_S * 2,
        resend_every: float = 1.0,
    ) -> Any:
        """Publish camera_info, depth and colour (again every ``resend_every`` s: best effort
        and discovery may lose the first) until ``done()`` returns something; return it."""
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= next_send:
                self.publish_pair(depth, colour, info)
                next_send = now + resend_every
            found = done()
            if found:
                return found
            if now >= deadline:
                raise AssertionError(
                    f"not done within {timeout} s; the client:\n{self.client.describe()}"
                )
            rclpy.spin_once(self.client.node, timeout_sec=0.02)

    def counters(self) -> dict[str, int]:
        """The newest depth status's counters (empty before the first)."""
        statuses = self.client.statuses(self.status)
        if not statuses:
            return {}
        values = status_values(statuses[-1])
        return {k: int(v) for k, v in values.items() if v.isdigit()}

    def wait_counters(self) -> dict[str, int]:
        self.client.spin_until(self.counters, message=f"a status {self.status!r}")
        return self.counters()

    def grown(self, name: str, before: dict[str, int]) -> Any:
        """A predicate: the counter ``name`` is above its value in ``before``."""
        return lambda: self.counters().get(name, 0) > before.get(name, 0)


def camera_info(header: Any, width: int, height: int, k: tuple | None = None) -> CameraInfo:
    fx, fy, cx, cy = k or (FX, FY, CX, CY)
    return CameraInfo(
        header=header,
        width=width,
        height=height,
        distortion_model="plumb_bob",
        d=[0.0] * 5,
        k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0],
        r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        p=[fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0],
    )


def depth_image(metres: np.ndarray, encoding: str, header: Any) -> Any:
    """A 16UC1 (millimetres, 0 = none) or 32FC1 (metres, NaN = none) depth Image."""
    if encoding == "16UC1":
        array = np.where(np.isfinite(metres), np.round(metres * 1000.0), 0).astype(np.uint16)
    else:
        array = metres.astype(np.float32)
    return make_image(array, encoding, header)


def cloud_array(cloud: PointCloud2) -> np.ndarray:
    """The points of a cloud as a ``(height, width)`` structured array, read through the
    cloud's own field table (names, offsets, datatypes), not the node's layout constant."""
    types = {7: "<f4", 4: "<u2", 2: "<u1", 6: "<u4", 8: "<f8"}  # PointField datatypes
    dtype = np.dtype(
        {
            "names": [f.name for f in cloud.fields],
            "formats": [types[f.datatype] for f in cloud.fields],
            "offsets": [f.offset for f in cloud.fields],
            "itemsize": cloud.point_step,
        }
    )
    assert not cloud.is_bigendian
    assert cloud.row_step == cloud.point_step * cloud.width
    assert len(cloud.data) == cloud.row_step * cloud.height
    return np.frombuffer(bytes(cloud.data), dtype=dtype).reshape(cloud.height, cloud.width)


def find_objects(client: OvssClient, header: Any) -> MarkerArray | None:
    """The MarkerArray of the frame with ``header`` (MarkerArray has no header: its markers'),
    or None."""
    from ros_harness import stamp_key

    for array in reversed(client.messages.get(client.topic("objects"), [])):
        if array.markers and stamp_key(array.markers[0].header) == stamp_key(header):
            return array
    return None
