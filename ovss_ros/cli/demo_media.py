"""ovss-demo's frames and pictures: read the images or a bag's image topic (no torch), and
annotate the overlays it writes with a summary line (and the RANDOM WEIGHTS warning)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

MAX_SIDE = 1280  # larger frames are shrunk to this long side (DDS and a CPU stay quick)
RANDOM_WARNING = "RANDOM WEIGHTS: the labels are meaningless; this shows the pipeline works"


def _fit(rgb: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 frame with its long side at most MAX_SIDE (INTER_AREA shrink)."""
    height, width = rgb.shape[:2]
    scale = MAX_SIDE / max(height, width)
    if scale >= 1:
        return np.ascontiguousarray(rgb)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def read_images(paths: list[Path], limit: int | None) -> list[tuple[str, np.ndarray]]:
    """(file name, HxWx3 uint8 RGB) of the first ``limit`` images; ValueError for one that
    cannot be decoded."""
    frames = []
    for path in paths[:limit]:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{str(path)!r} is not an image OpenCV can read")
        frames.append((path.name, _fit(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))))
    return frames


def read_bag(path: Path, topic: str | None, limit: int | None) -> list[tuple[str, np.ndarray]]:
    """(``topic@index``, HxWx3 uint8 RGB) of the first ``limit`` decodable frames of the bag's
    Image / CompressedImage ``topic`` (default: its only image topic); ValueError for a bag that
    cannot be read, no such topic, or no decodable frame."""
    from rosbags.rosbag2 import Reader

    from ovss_ros.ros.bag import IMAGE_READERS, FrameError, decode_frame
    from ovss_ros.ros.bag_files import BagError, bag_storage, read_topics

    try:
        bag_storage(path)
        topics = read_topics(path)
    except BagError as error:
        raise ValueError(str(error)) from None
    images = sorted(t for t, types in topics.items() if types & IMAGE_READERS.keys())
    if topic is None:
        if len(images) != 1:
            found = ", ".join(images) or "none"
            raise ValueError(f"--bag {str(path)!r}: name its image topic with --topic ({found})")
        topic = images[0]
    if topic not in images:
        raise ValueError(f"--topic {topic!r} is no image topic of the bag ({', '.join(images)})")
    frames: list[tuple[str, np.ndarray]] = []
    skipped = 0
    try:
        with Reader(path) as reader:
            connections = [c for c in reader.connections if c.topic == topic]
            for index, (connection, _time, raw) in enumerate(reader.messages(connections)):
                if limit is not None and len(frames) >= limit:
                    break
                try:
                    _header, rgb = decode_frame(raw, connection.msgtype)
                except FrameError:
                    skipped += 1
                    continue
                frames.append((f"{topic}@{index}", _fit(rgb)))
    except Exception as error:  # rosbags' reader errors: a broken bag
        raise ValueError(f"cannot read --bag {str(path)!r}: {error}") from error
    if not frames:
        raise ValueError(f"--topic {topic!r}: no decodable frame ({skipped} skipped)")
    return frames


def annotated(overlay: np.ndarray, lines: list[str], warn: bool) -> np.ndarray:
    """The overlay (HxWx3 RGB) with a strip below it holding ``lines`` (and, when ``warn``, the
    RANDOM WEIGHTS warning in red), as BGR for cv2.imwrite."""
    width = overlay.shape[1]
    scale = max(0.3, min(0.6, width / 1100))
    texts = [part for line in lines for part in _wrapped(line, width - 8, scale)]
    texts += _wrapped(RANDOM_WARNING, width - 8, scale) if warn else []
    line_height = int(26 * scale / 0.6) + 4
    strip = np.full((line_height * len(texts) + 6, width, 3), 255, np.uint8)
    for row, text in enumerate(texts):
        colour = (0, 0, 200) if warn and text in RANDOM_WARNING else (0, 0, 0)
        position = (4, line_height * (row + 1))
        cv2.putText(strip, text, position, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return np.vstack([cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR), strip])


def _wrapped(text: str, width: int, scale: float) -> list[str]:
    """``text`` in lines that fit ``width`` pixels, broken at ' | ', then at spaces."""

    def fits(candidate: str) -> bool:
        size = cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
        return size <= width

    lines: list[str] = []
    for separator in (" | ", " "):
        if separator not in text:
            continue
        current = ""
        for part in text.split(separator):
            candidate = f"{current}{separator}{part}" if current else part
            if current and not fits(candidate):
                lines.append(current)
                current = part
            else:
                current = candidate
        lines.append(current)
        if all(fits(line) for line in lines) or separator == " ":
            return lines
        lines = []
    return [text]
