"""``ovss-ctl diagnostics`` and ``ovss-ctl save-frame``: what ``ovss-ctl`` reads from the node's
topics (the node's names: docs/ros_interface.md, "Outputs" and "Diagnostics keys").

- diagnostics: the node's statuses on ``/diagnostics`` (named ``<node name>: <camera>``, e.g.
  ``ovss: image``), printed as ``<name>: <LEVEL> <message>`` and the key values indented.
- save-frame: the next ``~/overlay`` (rgb8) and ``~/labels`` (mono8, or mono16 above 254
  classes) of one frame (matched by header), or of camera NAME ``~/NAME/overlay``, written as
  PNG (overlay in colour, labels as the 8- or 16-bit label values).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from ovss_ros.cli.ctl_session import Session

LEVELS = {0: "OK", 1: "WARN", 2: "ERROR", 3: "STALE"}


def status_lines(status: Any) -> list[str]:
    """One DiagnosticStatus as text: ``name: LEVEL message``, then ``  key: value`` lines."""
    level = (
        int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else status.level
    )
    lines = [f"{status.name}: {LEVELS.get(level, level)} {status.message}"]
    lines += [f"  {entry.key}: {entry.value}" for entry in status.values]
    return lines


def watch_diagnostics(session: Session, once: bool, out: TextIO = sys.stdout) -> None:
    """Print the target's statuses: those of the next message that has one (``once``), or every
    one until interrupted. Raises NoAnswer when none comes within the timeout."""
    from diagnostic_msgs.msg import DiagnosticArray

    prefix = session.target.rsplit("/", 1)[-1] + ": "
    found: list[bool] = []

    def on_message(array: Any) -> None:
        statuses = [status for status in array.status if status.name.startswith(prefix)]
        if statuses and not (once and found):
            found.append(True)
            for status in statuses:
                print("\n".join(status_lines(status)), file=out, flush=True)

    session.node.create_subscription(DiagnosticArray, "/diagnostics", on_message, 10)
    if not session.spin_until(lambda: found, session.timeout):
        raise session.not_running()
    try:
        while not once:  # until Ctrl-C: this command's normal end
            session.executor.spin_once(timeout_sec=1.0)
    except KeyboardInterrupt:
        return


def image_array(message: Any) -> Any:
    """The pixels of an output Image: rgb8 (h, w, 3) uint8, mono8 (h, w) uint8, mono16 (h, w)
    uint16, honouring ``step`` and ``is_bigendian``. Raises ValueError for other encodings."""
    import numpy as np

    formats = {"rgb8": (np.uint8, 3), "mono8": (np.uint8, 1), "mono16": (np.dtype("<u2"), 1)}
    if message.encoding not in formats:
        raise ValueError(f"cannot write encoding {message.encoding!r} as PNG")
    dtype, channels = formats[message.encoding]
    dtype = np.dtype(dtype)
    if message.is_bigendian and dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">")
    row = message.width * channels * dtype.itemsize
    data = np.frombuffer(bytes(message.data), dtype=np.uint8)
    if message.step < row or data.size < message.step * message.height:
        raise ValueError(f"{message.encoding} image with a short step or data")
    rows = data[: message.step * message.height].reshape(message.height, message.step)[:, :row]
    array = np.ascontiguousarray(rows).view(dtype).astype(dtype.newbyteorder("="))
    shape = (message.height, message.width) + ((channels,) if channels > 1 else ())
    return array.reshape(shape)


def _key(message: Any) -> tuple[int, int, str]:
    header = message.header
    return header.stamp.sec, header.stamp.nanosec, header.frame_id


def save_frame(session: Session, out_dir: Path, camera: str) -> list[Path]:
    """Write the overlay and labels of the next frame the target publishes to ``out_dir``
    (``overlay.png``, ``labels.png``; ``<camera>_...`` with a camera); return the paths.
    Raises NoAnswer, or OSError when a file cannot be written."""
    import cv2
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    base = f"{session.target}/{camera}" if camera else session.target
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    topics = {f"{base}/overlay": (Image, qos), f"{base}/labels": (Image, qos)}
    overlay_topic, labels_topic = topics

    def pair(received: dict[str, list[Any]]) -> Any:
        labels = {_key(m): m for m in received[labels_topic]}
        return next((m for m in received[overlay_topic] if _key(m) in labels), None)

    received = session.wait_for_messages(topics, lambda r: pair(r) is not None)
    overlay = pair(received)
    labels = next(m for m in received[labels_topic] if _key(m) == _key(overlay))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{camera}_" if camera else ""
    paths = [out_dir / f"{stem}overlay.png", out_dir / f"{stem}labels.png"]
    images = [cv2.cvtColor(image_array(overlay), cv2.COLOR_RGB2BGR), image_array(labels)]
    for path, image in zip(paths, images, strict=True):
        if not cv2.imwrite(str(path), image):
            raise OSError(f"cannot write {path}")
    return paths
