"""sensor_msgs Image / CompressedImage <-> numpy, without cv_bridge.

cv_bridge has no usable wheel for a pip-installed ROS 2 (PyPI's ``cv-bridge`` is the ROS 1 port and
breaks on numpy 2 / OpenCV 5), so the node converts images itself. Incoming images become one
layout, HxWx3 uint8 RGB, because that is what the segmenter and the overlay take; outgoing
images (labels, masks, overlay, confidence) are built directly from numpy arrays.

Decoding reads ``msg.data`` in place through a strided numpy view (``step`` padding and
``is_bigendian`` honoured) and makes one pass, done by OpenCV, into a fresh array: the result never
aliases the message, so callers may modify it or hand it to ``torch.from_numpy``.

Where ``cv_bridge`` is importable (ROS from apt), it decodes the plain Image path; our validation
runs first either way so that bad input is rejected with the same ``ImageConversionError``, and
anything the bridge cannot do (or gets wrong: a ``step`` that is not a whole number of pixels)
goes through our converter. Both scale 16-bit data to 8 bits the same way (value * 255 / 65535).

Every input is bounded before anything is allocated for it: a raw image by its ``width * height``,
compressed data by the size declared in the header (``encoded_images``, which also reads image
files and which this module re-exports). Larger images raise :class:`ImageTooLarge`. Compressed
images always come out in their stored pixel grid, as image_transport and camera_info see them:
the EXIF / TIFF Orientation tag is not applied.
"""

from __future__ import annotations

import array as pyarray
import io
from typing import NamedTuple

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ovss_ros.ros.encoded_images import (  # the file readers: re-exported for the tools
    DEFAULT_MAX_INPUT_PIXELS,
    ImageConversionError,
    ImageTooLarge,
    check_pixels,
    decode_encoded,
    image_file_size,
    image_file_to_rgb8,
    max_file_bytes,
    read_header,
    valid_limit,
)

__all__ = [
    "DEFAULT_MAX_INPUT_PIXELS",
    "SUPPORTED_ENCODINGS",
    "ImageConversionError",
    "ImageTooLarge",
    "compressed_to_rgb8",
    "float32_to_image",
    "image_file_size",
    "image_file_to_rgb8",
    "image_to_rgb8",
    "max_file_bytes",
    "mono16_to_image",
    "mono8_to_image",
    "rgb8_to_image",
]

try:  # ROS from apt ships cv_bridge; the pip wheels do not.
    from cv_bridge import CvBridge

    _BRIDGE = CvBridge()
except Exception:  # a missing or broken install (the ROS 1 port on numpy 2) means our converter
    _BRIDGE = None


class _Layout(NamedTuple):
    channels: int
    bytes_per_channel: int
    to_rgb: int | None  # cv2 colour conversion code to RGB; None when already RGB


_RGB = _Layout(3, 1, None)
_BGR = _Layout(3, 1, cv2.COLOR_BGR2RGB)
_RGBA = _Layout(4, 1, cv2.COLOR_RGBA2RGB)
_BGRA = _Layout(4, 1, cv2.COLOR_BGRA2RGB)
_MONO = _Layout(1, 1, cv2.COLOR_GRAY2RGB)

_LAYOUTS: dict[str, _Layout] = {
    "rgb8": _RGB,
    "bgr8": _BGR,
    "rgba8": _RGBA,
    "bgra8": _BGRA,
    "mono8": _MONO,
    "mono16": _MONO._replace(bytes_per_channel=2),
    "rgb16": _RGB._replace(bytes_per_channel=2),
    "bgr16": _BGR._replace(bytes_per_channel=2),
    "rgba16": _RGBA._replace(bytes_per_channel=2),
    "bgra16": _BGRA._replace(bytes_per_channel=2),
    # OpenCV type names some drivers publish: single channel is grey, three channels are BGR.
    "8UC1": _MONO,
    "8UC3": _BGR,
    "16UC1": _MONO._replace(bytes_per_channel=2),
}

SUPPORTED_ENCODINGS: frozenset[str] = frozenset(_LAYOUTS)
"""The ``Image.encoding`` values :func:`image_to_rgb8` accepts."""

# 16 -> 8 bit maps the full 16-bit range onto 0..255 (value * 255 / 65535, rounded; 65535 / 255 is
# 257 and odd, so there are no ties). Full-range scaling is what cv_bridge does and what a 16-bit
# camera image means; a depth image (16UC1 in mm) comes out dark, which is honest: it is not a
# photo, and a per-frame min/max stretch would make the same scene flicker between frames.
# A 64 KiB lookup table does it in one pass for any byte order and stride, exactly.
_SCALE_16_TO_8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def image_to_rgb8(msg: Image, *, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> np.ndarray:
    """Convert a ``sensor_msgs/Image`` to a new, C-contiguous HxWx3 uint8 RGB array.

    Accepts the encodings in :data:`SUPPORTED_ENCODINGS`. Mono is replicated into three
    channels, alpha is dropped, 16-bit data is scaled by 255 / 65535 (rounded). Each row's first
    ``width * channels * bytes`` bytes are read; the rest of ``step`` is padding.

    Raises:
        ImageTooLarge: ``width * height`` exceeds ``max_pixels`` (checked before the data).
        ImageConversionError: unknown encoding, zero width or height, ``step`` smaller than a
            row, or ``data`` shorter than ``step * height``.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    valid_limit(max_pixels)
    layout = _LAYOUTS.get(msg.encoding)
    if layout is None:
        raise ImageConversionError(
            f"unsupported encoding {msg.encoding!r} (supported: {', '.join(sorted(_LAYOUTS))})"
        )
    height, width, step = msg.height, msg.width, msg.step
    if height == 0 or width == 0:
        raise ImageConversionError(f"zero-size image: width={width} height={height}")
    check_pixels(width, height, max_pixels, f"{msg.encoding} image")
    pixel_bytes = layout.channels * layout.bytes_per_channel
    if step < width * pixel_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than a row of {width} {msg.encoding} pixels "
            f"({width * pixel_bytes} bytes)"
        )
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    if buffer.size < step * height:
        raise ImageConversionError(
            f"data has {buffer.size} bytes, fewer than step * height = {step} * {height} = "
            f"{step * height}"
        )
    if _BRIDGE is not None and step % pixel_bytes == 0:  # cv_bridge misreads other padding
        try:
            rgb = _BRIDGE.imgmsg_to_cv2(msg, desired_encoding="rgb8")
            if rgb.shape == (height, width, 3) and rgb.dtype == np.uint8:
                return np.ascontiguousarray(rgb)
        except Exception:  # e.g. "8UC3 is not a colour format": ours knows what it means
            pass
    return _decode(buffer, height, width, step, layout, bool(msg.is_bigendian))


def _decode(
    buffer: np.ndarray, height: int, width: int, step: int, layout: _Layout, big_endian: bool
) -> np.ndarray:
    """Our converter: a strided view of the message bytes, then one pass into a new array."""
    if layout.bytes_per_channel == 1:
        dtype = np.dtype(np.uint8)
    else:
        dtype = np.dtype(">u2" if big_endian else "<u2")
    shape: tuple[int, ...] = (height, width, layout.channels)
    strides: tuple[int, ...] = (step, layout.channels * dtype.itemsize, dtype.itemsize)
    if layout.channels == 1:  # OpenCV takes grey images as HxW
        shape, strides = shape[:2], strides[:2]
    # A view: padding bytes are skipped by the row stride, nothing is copied yet.
    pixels = np.ndarray(shape, dtype=dtype, buffer=buffer, strides=strides)
    if dtype.itemsize == 2:
        pixels = np.take(_SCALE_16_TO_8, pixels)  # new contiguous uint8 array, any byte order
        if layout.to_rgb is None:
            return pixels
    elif layout.to_rgb is None:
        return pixels.copy()  # C order, and never aliases msg.data
    # cvtColor reads the padded view directly and is ~50x faster than numpy fancy indexing.
    return cv2.cvtColor(pixels, layout.to_rgb)


def compressed_to_rgb8(
    msg: CompressedImage, *, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS
) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG, WebP, ...) to HxWx3 uint8 RGB.

    The ``format`` field is informational only: the codec is recognised by its signature. The
    size declared in the header is read first (Pillow, header only) and checked against
    ``max_pixels``; only then does OpenCV decode. The result has the stored pixel grid's size
    (EXIF orientation is ignored, as image_transport and camera_info do). Grey and 16-bit PNGs
    are converted to 8-bit RGB by OpenCV. ``compressedDepth`` images (a private header in front of
    the PNG) are not supported and are rejected as undecodable, and so is any format whose size
    Pillow cannot read from the header (it could not be bounded before decoding).

    Raises:
        ImageTooLarge: the declared width * height exceeds ``max_pixels``.
        ImageConversionError: empty or undecodable data.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    valid_limit(max_pixels)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ImageConversionError(f"empty compressed image data (format {msg.format!r})")
    what = f"compressed image data ({data.size} bytes, format {msg.format!r})"
    header = read_header(io.BytesIO(data), what, max_pixels)
    return decode_encoded(data, header, what)


def rgb8_to_image(array: np.ndarray, header: Header) -> Image:
    """Build an ``rgb8`` Image from an HxWx3 uint8 array (any strides)."""
    return _to_image(array, header, "rgb8", np.dtype(np.uint8), channels=3)


def mono8_to_image(array: np.ndarray, header: Header) -> Image:
    """Build a ``mono8`` Image from an HxW uint8 array (any strides)."""
    return _to_image(array, header, "mono8", np.dtype(np.uint8), channels=1)


def mono16_to_image(array: np.ndarray, header: Header) -> Image:
    """Build a little-endian ``mono16`` Image from an HxW uint16 array (any strides/byte order)."""
    return _to_image(array, header, "mono16", np.dtype("<u2"), channels=1)


def float32_to_image(array: np.ndarray, header: Header) -> Image:
    """Build a little-endian ``32FC1`` Image from an HxW float32 array (any strides/byte order)."""
    return _to_image(array, header, "32FC1", np.dtype("<f4"), channels=1)


def _to_image(
    array: np.ndarray, header: Header, encoding: str, dtype: np.dtype, channels: int
) -> Image:
    if not isinstance(array, np.ndarray):
        raise ImageConversionError(f"{encoding} needs a numpy array, got {type(array).__name__}")
    # Same kind and size: only the byte order may differ, and that converts losslessly.
    if array.dtype.kind != dtype.kind or array.dtype.itemsize != dtype.itemsize:
        raise ImageConversionError(
            f"{encoding} needs a {dtype.name} array, got dtype {array.dtype}"
        )
    if channels == 1:
        shape_ok, expected = array.ndim == 2, "HxW"
    else:
        shape_ok, expected = array.ndim == 3 and array.shape[2] == channels, f"HxWx{channels}"
    if not shape_ok:
        raise ImageConversionError(
            f"{encoding} needs an {expected} array, got shape {array.shape}"
        )
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageConversionError(f"{encoding} array has zero size: shape {array.shape}")
    contiguous = np.ascontiguousarray(array, dtype=dtype)  # copies only when needed
    data = _byte_array(contiguous)
    msg = Image(**_KEEP_DATA)
    msg.header = header
    msg.height = height
    msg.width = width
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = width * channels * dtype.itemsize
    msg.data = data
    return msg


# How rclpy's generated ``data`` setter treats a value (640x480 rgb8, measured on Kilted):
# with field checks off (the default) it copies anything into a new ``array.array('B')``: one more
# copy and, worse, one more 0.9 MB allocation per frame (~0.9 ms of page faults); with checks on
# (per message, ROS_PYTHON_CHECK_FIELDS=1, or always on Humble) it stores an ``array.array('B')``
# as it is and walks anything else element by element (bytes: ~60 ms). So we hand it an
# ``array.array('B')`` with checks on for our own messages, whose fields are valid anyway.
_KEEP_DATA: dict[str, bool] = {"check_fields": True} if "_check_fields" in Image.__slots__ else {}


def _byte_array(contiguous: np.ndarray) -> pyarray.array:
    """Copy a C-contiguous array's bytes, once, into the ``array.array('B')`` rclpy stores."""
    data = pyarray.array("B")
    data.frombytes(contiguous.reshape(-1).view(np.uint8))  # a byte view: frombytes wants "B"
    return data
