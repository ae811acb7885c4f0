"""Text from outside (requests, frames, errors) made safe for one log line or refusal reason.

One place for what the node, its parameter checks and its request guard all need: whitespace
runs collapsed, non-printable characters escaped (request data cannot forge log lines: a newline
or an ANSI escape in a class name stays visible as an escape), long values cut. Only the
standard library is imported.
"""

from __future__ import annotations

import array
import time
from collections.abc import Hashable
from typing import Any

REASON_LIMIT = 400  # text from requests (names, values) in a reason
# A failure's reason (an exception's text): whole, however long it is in practice (a model that
# cannot be loaded names what to set, ~500 characters); the bound only guards the log.
ERROR_LIMIT = 2000


def one_line(text: str, limit: int = REASON_LIMIT) -> str:
    """Text for one log line or reason: whitespace runs as one space, non-printable characters
    escaped (request data cannot forge log lines), at most ``limit`` characters: a longer text
    is cut at a word boundary and says how much was left off (``cut``)."""
    text = "".join(
        char if char.isprintable() else f"\\u{ord(char):04x}" for char in " ".join(text.split())
    )
    return cut(text, limit)


def cut(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its start, ended at a word boundary
    (a space in the last fifth; mid-word only without one), then " ... (N more characters)":
    at most ``limit`` characters in all."""
    if len(text) <= limit:
        return text
    left_off = len(text)
    for _ in range(3):  # the count's digits change the room left: settles within two rounds
        suffix = f" ... ({left_off} more characters)"
        keep = max(limit - len(suffix), 0)
        space = text.rfind(" ", keep - keep // 5, keep + 1)
        end = space if space > 0 else keep
        left_off = len(text) - end
    return text[:end].rstrip() + f" ... ({len(text) - end} more characters)"


def describe(error: BaseException) -> str:
    """``Type: message`` on one line, whole up to ERROR_LIMIT characters (a failure's reason)."""
    return one_line(f"{type(error).__name__}: {error}", ERROR_LIMIT)


def quoted(value: Any, limit: int = 80) -> str:
    """``repr`` of user-given text for messages and logs: control and format characters escaped
    (a newline cannot forge a log line), long values cut with an ellipsis."""
    text = repr(list(value) if isinstance(value, array.array) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class KindThrottle:
    """Lets a log line of each kind through at most once in ``period`` seconds: a stream of the
    same problem gives a line every few seconds, and a new kind of problem shows at once
    (rclpy's ``throttle_duration_sec`` throttles per call site, which would hide it behind the
    first kind)."""

    def __init__(self, period: float) -> None:
        self._period = period
        self._last: dict[Hashable, float] = {}  # kind -> time.monotonic() when last let through

    def due(self, kind: Hashable) -> bool:
        """True (and the kind's period starts again) if no line of ``kind`` went out within the
        period."""
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) < self._period:
            return False
        self._last[kind] = now
        return True
