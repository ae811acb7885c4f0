"""``ovss-ctl play``: image files as a camera on the node's input topic, for a node started by
hand in the venv (which has no ``image_publisher`` or ``ros2 bag play``).

Each image is read with OpenCV (shrunk to a long side of 1280 px, as ``ovss-demo`` does) and
published as a ``sensor_msgs/Image`` (rgb8) stamped with the time it is sent, with the sensor-data
QoS of a camera driver, at ``--rate`` Hz, once through (or round again with ``--loop`` until
Ctrl-C). It waits up to ``--timeout`` s for a subscriber first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from ovss_ros.cli.ctl_session import NoAnswer, Session


def read_frames(inputs: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """(file name, HxWx3 uint8 RGB) of every image of ``inputs`` (files, or folders of images).
    Raises ValueError for an input that does not exist, a folder without images, or a file
    OpenCV cannot decode (all checked before anything is published)."""
    from ovss_ros.cli.demo_media import read_images
    from ovss_ros.cli.segment import image_files
    from ovss_ros.cli.tool_parser import IMAGE_SUFFIXES

    try:
        paths = image_files(inputs)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    if not paths:
        raise ValueError(f"no images in {', '.join(inputs)} ({', '.join(IMAGE_SUFFIXES)})")
    return read_images(paths, None)


def play(
    session: Session,
    frames: list[tuple[str, np.ndarray]],
    topic: str,
    rate: float,
    loop: bool,
    frame_id: str,
    out: TextIO = sys.stdout,
) -> int:
    """Publish ``frames`` on ``topic`` at ``rate`` Hz (round again while ``loop``); the number
    published. Raises NoAnswer when nothing subscribes to ``topic`` within the timeout."""
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from ovss_ros.ros.image_conversion import rgb8_to_image

    publisher = session.node.create_publisher(Image, topic, qos_profile_sensor_data)
    if not session.spin_until(lambda: publisher.get_subscription_count() > 0, session.timeout):
        raise NoAnswer(
            f"nothing subscribed to {topic} within {session.timeout:g} s: is the node running, "
            "in this ROS_DOMAIN_ID, with its input on that topic?"
        )
    topic = publisher.topic_name
    sent = 0
    due = time.monotonic()
    try:
        while True:
            for name, rgb in frames:
                stamp: Any = session.node.get_clock().now().to_msg()
                publisher.publish(rgb8_to_image(rgb, Header(stamp=stamp, frame_id=frame_id)))
                sent += 1
                print(f"{sent}: {name} -> {topic}", file=out, flush=True)
                due += 1.0 / rate
                while (left := due - time.monotonic()) > 0:
                    session.executor.spin_once(timeout_sec=min(left, 0.1))
            if not loop:
                return sent
    except KeyboardInterrupt:
        if not loop:  # stopped before the end: the caller says so (status 130)
            raise
        return sent  # --loop: Ctrl-C is its end
