"""ovss-demo's checked arguments and the files it ships (shared by ``demo`` and ``demo_run``;
no imports beyond the standard library)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED_IMAGES = DATA / "demo_images"
RANDOM_MODEL = DATA / "demo-tiny-vit.json"
VOC_IMAGES = Path(
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc/JPEGImages"
)
DEFAULT_CLASSES = ("person", "cat", "dog", "chair", "table", "floor", "wall")
DEFAULT_THEN_CLASSES = ("person", "sofa", "bottle", "door", "window")
DOMAIN_IDS = range(101, 200)  # away from 0 (everyone's) and the tests' 1..100
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class DemoArgs:
    """The checked arguments."""

    frames: list[tuple[str, Any]]  # (name, HxWx3 uint8 RGB) to play, in order
    source: str  # where they come from, for the messages
    rate: float
    classes: list[str]
    then_classes: list[str]
    change_after: int | None  # None: half of the frames
    output: Path
    domain_id: int
    domain_chosen: bool
    device: str | None  # None: cuda when present, else cpu
    download: bool
    frame_timeout: float
    startup_timeout: float


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (the demo ends with 143 and says so)."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: raise Terminated in the main thread."""
    raise Terminated
