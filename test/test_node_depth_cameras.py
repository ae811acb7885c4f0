"""Labels in 3D with several cameras (``cameras: [front, rear]``): each camera reads its own
depth (``front/depth/image``), pairs it with its own frames and publishes ``~/front/points``."""

from __future__ import annotations

import numpy as np
from depth_client import DepthClient
from ros_harness import running_node
from test_node_depth import HEIGHT, PARAMETERS, WIDTH, frame, plane


def test_each_camera_pairs_its_own_depth():
    """cameras [front, rear]: front/depth/image makes ~/front/points, counted on the front's
    depth status; the rear's depth status counts nothing until it gets depth, and then
    refuses it without camera_info."""
    parameters = PARAMETERS | {"cameras": ["front", "rear"]}
    with running_node(parameters, cameras=["front", "rear"]) as (client, _):
        front, rear = DepthClient(client, "front"), DepthClient(client, "rear")
        front.watch()
        rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        depth, colour, info = frame(client, rgb, plane())

        def front_cloud():
            return client.find("front/points", colour.header)

        cloud = front.send_until(depth, colour, front_cloud, info)
        assert cloud.width == int(np.isfinite(plane()).sum())
        assert not client.messages.get(client.topic("rear/points"))
        client.spin_until(lambda: front.counters().get("clouds published", 0) >= 1)
        assert rear.wait_counters()["depth received"] == 0

        # The rear camera has had no camera_info: its frames are refused as such, and the
        # front camera's outputs go on.
        rear.watch()
        depth, colour, _ = frame(client, rgb, plane())
        rear.send_until(depth, colour, rear.grown("camera_info missing", {}), None)
        assert not client.find("rear/points", colour.header)
        depth, colour, info = frame(client, rgb, plane())
        assert front.send_until(
            depth, colour, lambda: client.find("front/points", colour.header), info
        )
