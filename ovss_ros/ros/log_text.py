"""Text from outside (requests, frames, errors) made safe for one log line or refusal reason.

One place for what the node, its parameter checks and its request guard all need: whitespace
runs collapsed, non-printable characters escaped (request data cannot forge log lines: a newline
or an ANSI escape in a class name stays visible as an escape), long values cut. Only the
standard library is imported.
"""

from __future__ import annotations

import array
from typing import Any

REASON_LIMIT = 400


def one_line(text: str, limit: int = REASON_LIMIT) -> str:
    """Text for one log line or reason: whitespace runs as one space, non-printable characters
    escaped (request data cannot forge log lines), cut to ``limit`` characters."""
    text = "".join(
        char if char.isprintable() else f"\\u{ord(char):04x}" for char in " ".join(text.split())
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: BaseException) -> str:
    """``Type: message`` on one line."""
    return one_line(f"{type(error).__name__}: {error}")


def quoted(value: Any, limit: int = 80) -> str:
    """``repr`` of user-given text for messages and logs: control and format characters escaped
    (a newline cannot forge a log line), long values cut with an ellipsis."""
    text = repr(list(value) if isinstance(value, array.array) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
