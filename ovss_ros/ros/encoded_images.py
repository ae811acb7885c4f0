"""Encoded images (PNG, JPEG, WebP, TIFF, ...) bounded before they are decoded: no ROS here.

Every encoded input, a ``CompressedImage``'s data or an image file, is bounded by the size its
header declares, read with Pillow's lazy ``Image.open`` (the header only), before OpenCV decodes
anything; a file is also bounded by its byte size and must be a regular file. Larger images raise
:class:`ImageTooLarge`. Images always come out in their stored pixel grid, as image_transport and
camera_info see them (and as data sets' ground-truth masks are stored): the EXIF / TIFF
Orientation tag is not applied. Used by ``image_conversion`` (the node, the bag tool) and by the
tools that read image files (``cli``, ``evaluation``, ``training``).
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, NamedTuple

import cv2
import numpy as np
from PIL import ExifTags
from PIL import Image as PILImage


class ImageConversionError(ValueError):
    """An image message or array that cannot be converted; the message says why."""


class ImageTooLarge(ImageConversionError):
    """An image whose declared ``width * height`` exceeds the pixel limit; refused undecoded.

    ``width`` and ``height`` are the declared size (None when the header could not be read to
    the end because Pillow's own decompression-bomb limit stopped it), ``max_pixels`` the limit.
    """

    def __init__(self, reason: str, width: int | None, height: int | None, max_pixels: int):
        super().__init__(reason)
        self.width = width
        self.height = height
        self.max_pixels = max_pixels


DEFAULT_MAX_INPUT_PIXELS = 40_000_000
"""Default limit on an input image's ``width * height`` (pixels), checked before decoding.

40 MP takes every camera resolution in use on robots with room to spare, 8K included (7680x4320 =
33.2 MP, DCI 8K 8192x4320 = 35.4 MP), and bounds one decoded frame to 120 MB of RGB. A 17.6 KB
PNG declaring 12000x12000 pixels (144 MP) cost 78 s and 14.7 GB before this limit; now it is
refused from its header. It is below Pillow's own decompression-bomb limits (89.5 MP warns,
179 MP raises), so those never decide.
"""


def check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Raise ImageTooLarge when ``width * height > max_pixels``."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{what} declares {width}x{height} = {width * height} pixels, more than "
            f"max_input_pixels = {max_pixels}",
            width,
            height,
            max_pixels,
        )


def valid_limit(max_pixels: int) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return max_pixels


def image_file_to_rgb8(path: Path, *, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB, bounded and oriented as compressed images are.

    Only the header is read before the size check, so a file over the limit is refused without
    reading its pixel data. The result has the stored pixel grid (EXIF orientation ignored), the
    grid of the ground-truth masks of segmentation data sets.

    Raises:
        ImageTooLarge: the declared width * height exceeds ``max_pixels``, or the file is
            larger than such an image can be (``max_file_bytes``).
        ImageConversionError: not a regular file (a FIFO or device is never opened), not an
            image file OpenCV can decode.
        OSError: the file cannot be read.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    valid_limit(max_pixels)
    limit = _check_file(path, max_pixels)
    with Path(path).open("rb") as stream:
        header = read_header(stream, "image", max_pixels)
        stream.seek(0)
        data = np.frombuffer(stream.read(limit + 1), dtype=np.uint8)
    return decode_encoded(data, header, "image")


def image_file_size(path: Path, *, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> tuple[int, int]:
    """(width, height) an image file declares, from its header alone, checked as
    ``image_file_to_rgb8`` checks it before decoding (for readers that decode with another
    library afterwards: the evaluation's OpenCV ``imread``, label PNGs with Pillow).

    Raises ImageTooLarge, ImageConversionError (not a regular file, no image header), OSError.
    """
    valid_limit(max_pixels)
    _check_file(path, max_pixels)
    with Path(path).open("rb") as stream:
        header = read_header(stream, f"image {path}", max_pixels)
    return header.width, header.height


def _check_file(path: Path, max_pixels: int) -> int:
    """Refuse what is not a regular file (a FIFO would block, /dev/zero never end) or is larger
    than an image of ``max_pixels`` can be; return that byte limit."""
    info = os.stat(path)  # follows links; raises OSError (FileNotFoundError, ...)
    if not stat.S_ISREG(info.st_mode):
        raise ImageConversionError(f"{path} is not a regular file (a device, pipe or socket)")
    limit = max_file_bytes(max_pixels)
    if info.st_size > limit:
        raise ImageTooLarge(
            f"image file of {info.st_size} bytes, more than any image of max_input_pixels = "
            f"{max_pixels} needs ({limit} bytes)",
            None,
            None,
            max_pixels,
        )
    return limit


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file read for a pixel limit: 8 bytes a pixel (16-bit RGBA, stored
    uncompressed) and 16 MB of headers, metadata and thumbnails. A larger file is refused
    before it is read, whatever its header declares."""
    return 8 * max_pixels + (16 << 20)


class EncodedHeader(NamedTuple):
    format: str  # Pillow's name: JPEG, PNG, TIFF, ...
    width: int
    height: int
    orientation: int  # the TIFF Orientation tag (1..8) that OpenCV's TIFF reader applies; else 1


def read_header(stream: BinaryIO, what: str, max_pixels: int) -> EncodedHeader:
    """The declared size, from the header alone (Pillow's ``Image.open`` is lazy)."""
    # Pillow's own decompression-bomb check (a warning above PIL.Image.MAX_IMAGE_PIXELS, 89.5 MP by
    # default, an error above twice that) runs inside Image.open. Our limit decides: the warning
    # (and any other Pillow warning about these untrusted bytes) is silenced here; the error, which
    # comes before the size is known, becomes an ImageTooLarge. So data over Pillow's error limit
    # is refused even when max_pixels is larger (by default max_pixels is far below it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with PILImage.open(stream) as image:
                width, height = image.size
                orientation = 1
                if image.format == "TIFF":
                    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                header = EncodedHeader(str(image.format), width, height, orientation)
        except PILImage.DecompressionBombError as error:
            limit = 2 * (PILImage.MAX_IMAGE_PIXELS or 0)
            raise ImageTooLarge(
                f"{what} declares more than {limit} pixels, Pillow's decompression-bomb "
                f"limit (max_input_pixels = {max_pixels})",
                None,
                None,
                max_pixels,
            ) from error
        except Exception as error:  # untrusted bytes: any failure to parse is a refusal
            detail = (
                "no image format recognised"
                if isinstance(error, PILImage.UnidentifiedImageError)
                else f"{type(error).__name__}: {error}"
            )
            raise ImageConversionError(
                f"undecodable {what}: cannot read its size from the header ({detail})"
            ) from error
    if width <= 0 or height <= 0:
        raise ImageConversionError(f"undecodable {what}: header declares {width}x{height}")
    check_pixels(width, height, max_pixels, what)
    return header


# OpenCV's TIFF reader applies the Orientation tag even with IMREAD_IGNORE_ORIENTATION (libtiff's
# oriented read, OpenCV 5.0); this undoes it. Orientation o maps the stored grid to the display;
# the inverse of 6 is 8 and vice versa, the others are their own inverse (TIFF 6.0, tag 274).
_UNDO_ORIENTATION = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
}


def decode_encoded(data: np.ndarray, header: EncodedHeader, what: str) -> np.ndarray:
    """OpenCV decode of checked data into RGB, in the stored pixel grid."""
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as error:
        bgr = None
        detail = f": {error}"
    else:
        detail = ""
    if bgr is None:
        raise ImageConversionError(f"undecodable {what}{detail}")
    if header.format == "TIFF" and header.orientation in _UNDO_ORIENTATION:
        bgr = _UNDO_ORIENTATION[header.orientation](bgr)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
