"""The ``--max-input-pixels`` flag of the command-line tools that read images."""

from __future__ import annotations

import argparse

from ovss_ros.ros.image_conversion import DEFAULT_MAX_INPUT_PIXELS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_max_input_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--max-input-pixels N`` (default :data:`DEFAULT_MAX_INPUT_PIXELS`)."""
    parser.add_argument(
        "--max-input-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_INPUT_PIXELS,
        metavar="N",
        help="refuse (and count) images whose width * height, read from the header before "
        f"decoding, exceeds N (default {DEFAULT_MAX_INPUT_PIXELS})",
    )
