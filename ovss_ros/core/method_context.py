"""What every method family is built from: the Segmenter's loaded CLIP, its text encoder, the
stop event and the text-cache guard (``Loaded``), handed to a family's update function
(``core.method.FamilyUpdate``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ovss_ros.core.clip.model_loading import LoadedClip
from ovss_ros.core.clip.text_encoding import TextEncoder


@dataclass(frozen=True)
class Loaded:
    """What the Segmenter holds for every family: the CLIP model, its text encoder (one cache
    for all), the stop event, and ``attempt`` (runs an encoding; on failure it bounds the text
    cache to the vocabulary in force, then re-raises)."""

    clip: LoadedClip
    text: TextEncoder
    stop: threading.Event | None
    attempt: Callable[[Callable[[], Any]], Any]
