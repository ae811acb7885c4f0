"""Image <-> numpy conversion against independent numpy references, on a real VOC photo.

Messages are real ``sensor_msgs`` messages whose bytes the tests lay out themselves (channel
order, byte order and row padding built here, not by the module), and expected pixels come from
plain numpy arithmetic (16-bit: float ``rint(v * 255 / 65535)``), plus a few byte-level cases
written out by hand so that a mistake shared by the layout helper and the module still shows.
"""

import importlib.util

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

import ovss_ros.ros.image_conversion as ic
from ovss_ros.ros.image_conversion import (
    ImageConversionError,
    compressed_to_rgb8,
    float32_to_image,
    image_to_rgb8,
    mono8_to_image,
    mono16_to_image,
    rgb8_to_image,
)

# encoding -> (channel order in the message, bits per channel); written independently of the
# module's table (test_supported_encodings_are_all_tested keeps the two in step).
ENCODINGS = {
    "rgb8": ("rgb", 8),
    "bgr8": ("bgr", 8),
    "rgba8": ("rgba", 8),
    "bgra8": ("bgra", 8),
    "mono8": ("mono", 8),
    "8UC1": ("mono", 8),
    "8UC3": ("bgr", 8),
    "rgb16": ("rgb", 16),
    "bgr16": ("bgr", 16),
    "rgba16": ("rgba", 16),
    "bgra16": ("bgra", 16),
    "mono16": ("mono", 16),
    "16UC1": ("mono", 16),
}
PAD_BYTE = 0xA5  # padding content: reading it as pixels would change the result
HEADER = Header(stamp=Time(sec=1_700_000_123, nanosec=456_789), frame_id="camera_optical")


@pytest.fixture(scope="module")
def photo(voc_rgb: list[np.ndarray]) -> np.ndarray:
    """A real photo, cropped to odd, unequal sides so that a swapped height/width shows."""
    image = voc_rgb[0][:187, :251]
    assert image.shape == (187, 251, 3) and image.std() > 20  # real content, not a flat image
    return np.ascontiguousarray(image)


@pytest.fixture(scope="module")
def photo16(photo: np.ndarray) -> np.ndarray:
    """16-bit version of the photo with a random low byte, so scaling is not just ``>> 8``."""
    low = np.random.default_rng(1).integers(0, 256, photo.shape, dtype=np.uint16)
    return photo.astype(np.uint16) * 256 + low


def scale16(values: np.ndarray) -> np.ndarray:
    """Reference 16 -> 8 bit: the full range, value * 255 / 65535, rounded (float arithmetic)."""
    return np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def message_channels(rgb: np.ndarray, order: str, alpha: np.ndarray) -> np.ndarray:
    """Pixels in the message's channel order (HxWxC); alpha is arbitrary content to drop."""
    if order == "mono":
        return rgb[..., 1:2]  # one real channel as the grey image
    bgr = rgb[..., ::-1]
    return {
        "rgb": rgb,
        "bgr": bgr,
        "rgba": np.dstack([rgb, alpha]),
        "bgra": np.dstack([bgr, alpha]),
    }[order]


def make_image(
    pixels: np.ndarray, encoding: str, *, padding: int = 0, big_endian: bool = False
) -> Image:
    """Lay out an Image by hand: rows of pixel bytes in the given byte order, then padding."""
    height = pixels.shape[0]
    if pixels.dtype.itemsize == 2:
        pixels = pixels.astype(">u2" if big_endian else "<u2")
    rows = np.ascontiguousarray(pixels).reshape(height, -1).view(np.uint8)
    padded = np.hstack([rows, np.full((height, padding), PAD_BYTE, np.uint8)])
    return Image(
        header=HEADER,
        height=height,
        width=pixels.shape[1],
        encoding=encoding,
        is_bigendian=int(big_endian),
        step=padded.shape[1],
        data=padded.tobytes(),
    )


@pytest.fixture(params=["ours"] + (["cv_bridge"] if ic._BRIDGE is not None else []))
def converter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run decode tests through our converter, and through cv_bridge where one is installed."""
    if request.param == "ours":
        monkeypatch.setattr(ic, "_BRIDGE", None)
    return request.param


def test_supported_encodings_are_all_tested() -> None:
    assert ic.SUPPORTED_ENCODINGS == set(ENCODINGS)


@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big"])
@pytest.mark.parametrize("padding", [0, 1, 6], ids=["tight", "pad1", "pad6"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_decode_matches_reference(
    converter: str,
    photo: np.ndarray,
    photo16: np.ndarray,
    encoding: str,
    padding: int,
    big_endian: bool,
) -> None:
    order, bits = ENCODINGS[encoding]
    source = photo if bits == 8 else photo16
    alpha = np.random.default_rng(2).integers(0, 256 if bits == 8 else 65536, source.shape[:2])
    pixels = message_channels(source, order, alpha.astype(source.dtype))
    # is_bigendian on 8-bit data is meaningless and must not matter
    msg = make_image(pixels, encoding, padding=padding, big_endian=big_endian)

    rgb = image_to_rgb8(msg)

    expected = source if bits == 8 else scale16(source)
    if order == "mono":
        grey = expected[..., 1]
        expected = np.stack([grey, grey, grey], axis=-1)
    assert rgb.dtype == np.uint8 and rgb.shape == photo.shape
    np.testing.assert_array_equal(rgb, expected)
    assert rgb.flags.c_contiguous and rgb.flags.writeable
    assert not np.shares_memory(rgb, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize(
    ("encoding", "is_bigendian", "width", "step", "data", "expected"),
    [
        # 16 -> 8 bit: 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 257 * 10 -> 10, 65535 -> 255
        ("mono16", 1, 4, 8, b"\x00\x80\x00\x81\x0a\x0a\xff\xff", [0, 1, 10, 255]),
        # the same bytes little-endian: 0x8000 = 32768 -> 127.502 -> 128, 0x8100 -> 128.498 -> 128
        ("mono16", 0, 2, 4, b"\x00\x80\x00\x81", [128, 128]),
        ("16UC1", 0, 1, 2, b"\xff\x00", [1]),  # 255 -> 0.992 -> 1
        ("mono8", 0, 2, 3, b"\x07\xc8\xee", [7, 200]),  # one padding byte per row
        ("8UC1", 0, 1, 1, b"\x09\x01\x02", [9]),  # trailing bytes beyond step * height
    ],
    ids=["mono16-big", "mono16-little", "16UC1", "mono8-padded", "8UC1-trailing-bytes"],
)
def test_mono_exact_bytes(
    converter: str,
    encoding: str,
    is_bigendian: int,
    width: int,
    step: int,
    data: bytes,
    expected: list[int],
) -> None:
    msg = Image(
        height=1, width=width, encoding=encoding, is_bigendian=is_bigendian, step=step, data=data
    )
    rgb = image_to_rgb8(msg)
    np.testing.assert_array_equal(rgb, np.array([[[v, v, v] for v in expected]], np.uint8))


@pytest.mark.parametrize(
    ("encoding", "is_bigendian", "data", "expected"),
    [
        ("rgb8", 0, [10, 20, 30], [10, 20, 30]),
        ("bgr8", 0, [10, 20, 30], [30, 20, 10]),
        ("8UC3", 0, [10, 20, 30], [30, 20, 10]),
        ("rgba8", 0, [10, 20, 30, 40], [10, 20, 30]),
        ("bgra8", 0, [10, 20, 30, 40], [30, 20, 10]),
        ("rgb16", 1, [0, 0, 0xFF, 0xFF, 0x0A, 0x0A], [0, 255, 10]),
        ("bgr16", 0, [0, 0, 0xFF, 0xFF, 0x0A, 0x0A], [10, 255, 0]),
        ("rgba16", 0, [0xFF, 0xFF, 0, 0, 0, 0, 0x12, 0x34], [255, 0, 0]),
        ("bgra16", 1, [0x14, 0x14, 0, 0, 0, 0, 0xFF, 0xFF], [0, 0, 20]),
    ],
    ids=["rgb8", "bgr8", "8UC3", "rgba8", "bgra8", "rgb16-big", "bgr16", "rgba16", "bgra16-big"],
)
def test_colour_exact_bytes(
    converter: str, encoding: str, is_bigendian: int, data: list[int], expected: list[int]
) -> None:
    msg = Image(
        height=1, width=1, encoding=encoding, is_bigendian=is_bigendian, step=len(data), data=data
    )
    np.testing.assert_array_equal(image_to_rgb8(msg), np.array([[expected]], np.uint8))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"encoding": "yuv422"}, r"unsupported encoding 'yuv422'"),
        ({"encoding": "RGB8"}, r"unsupported encoding 'RGB8'"),
        ({"encoding": ""}, r"unsupported encoding ''"),
        ({"width": 0, "step": 0, "data": b""}, r"zero-size image: width=0 height=2"),
        ({"height": 0, "data": b""}, r"zero-size image: width=4 height=0"),
        ({"step": 11}, r"step 11 is smaller than a row of 4 rgb8 pixels \(12 bytes\)"),
        ({"step": 0}, r"step 0 is smaller than a row"),
        ({"data": bytes(23)}, r"data has 23 bytes, fewer than step \* height = 12 \* 2 = 24"),
        ({"data": b""}, r"data has 0 bytes, fewer than step \* height"),
        ({"encoding": "mono16", "step": 7}, r"step 7 is smaller .* mono16 pixels \(8 bytes\)"),
    ],
    ids=[
        "unknown-encoding",
        "upper-case-encoding",
        "empty-encoding",
        "zero-width",
        "zero-height",
        "small-step",
        "zero-step",
        "short-data",
        "empty-data",
        "small-step-16-bit",
    ],
)
def test_rejects_bad_image(converter: str, fields: dict, reason: str) -> None:
    good = {"height": 2, "width": 4, "encoding": "rgb8", "step": 12, "data": bytes(range(24))}
    image_to_rgb8(Image(**good))  # the unmodified message is fine
    with pytest.raises(ImageConversionError, match=reason):
        image_to_rgb8(Image(**{**good, **fields}))


@pytest.fixture(scope="module")
def photo_bgr(photo: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(photo[..., ::-1])


@pytest.mark.parametrize(
    ("extension", "grey", "exact"),
    [(".png", False, True), (".png", True, True), (".jpg", False, False)],
    ids=["png", "png-grey", "jpeg"],
)
def test_compressed_decodes_real_photo(
    photo: np.ndarray, photo_bgr: np.ndarray, extension: str, grey: bool, exact: bool
) -> None:
    source = np.ascontiguousarray(photo_bgr[..., 1]) if grey else photo_bgr
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if extension == ".jpg" else []
    ok, encoded = cv2.imencode(extension, source, params)
    assert ok
    msg = CompressedImage(header=HEADER, format=extension[1:], data=encoded.tobytes())

    rgb = compressed_to_rgb8(msg)

    expected = np.stack([photo[..., 1]] * 3, axis=-1) if grey else photo
    assert rgb.dtype == np.uint8 and rgb.shape == photo.shape and rgb.flags.c_contiguous
    if exact:
        np.testing.assert_array_equal(rgb, expected)
    else:  # lossy, but in RGB order: swapped channels would be far off on this photo
        error = np.abs(rgb.astype(int) - expected).mean()
        swapped = np.abs(rgb[..., ::-1].astype(int) - expected).mean()
        assert error < 2.0 and swapped > 5 * error


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", r"empty compressed image data \(format 'jpeg'\)"),
        (
            bytes(range(256)) * 4,
            r"undecodable compressed image data \(1024 bytes, format 'jpeg'\)",
        ),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), r"undecodable compressed image data \(48 bytes"),
        (b"\xff\xd8\xff\xe0" + bytes(40), r"undecodable compressed image data \(44 bytes"),
    ],
    ids=["empty", "garbage", "png-signature-garbage", "jpeg-signature-garbage"],
)
def test_rejects_bad_compressed(data: bytes, reason: str) -> None:
    with pytest.raises(ImageConversionError, match=reason):
        compressed_to_rgb8(CompressedImage(format="jpeg", data=data))


def _layouts(array: np.ndarray) -> dict[str, np.ndarray]:
    """The same kind of array in memory layouts a caller may hand in."""
    variants = {
        "contiguous": array,
        "strided": array[::2, 1::3],
        "reversed": array[::-1, ::-1],
        "fortran": np.asfortranarray(array),
        "transposed": array.swapaxes(0, 1),
    }
    if array.dtype.itemsize > 1:
        variants["big-endian"] = array.astype(array.dtype.newbyteorder(">"))
    return variants


ENCODERS = {
    # name: (encoder, encoding, little-endian dtype, channels, source array from the photo)
    "rgb8": (rgb8_to_image, "rgb8", "u1", 3, lambda rgb, rgb16: rgb),
    "mono8": (mono8_to_image, "mono8", "u1", 1, lambda rgb, rgb16: rgb[..., 0]),
    "mono16": (mono16_to_image, "mono16", "<u2", 1, lambda rgb, rgb16: rgb16[..., 2]),
    "32FC1": (
        float32_to_image,
        "32FC1",
        "<f4",
        1,
        lambda rgb, rgb16: (rgb[..., 1] / np.float32(255.0)).astype(np.float32),
    ),
}
ENCODE_CASES = [
    pytest.param(name, layout, id=f"{name}-{layout}")
    for name in ENCODERS
    for layout in ["contiguous", "strided", "reversed", "fortran", "transposed"]
    + (["big-endian"] if ENCODERS[name][2] != "u1" else [])
]


@pytest.mark.parametrize(("name", "layout"), ENCODE_CASES)
def test_encode_any_layout(photo: np.ndarray, photo16: np.ndarray, name: str, layout: str) -> None:
    encoder, encoding, dtype, channels, make_source = ENCODERS[name]
    array = _layouts(make_source(photo, photo16).copy())[layout]  # views of a private copy
    assert array.flags.c_contiguous == (layout in ("contiguous", "big-endian"))
    values = array.copy()
    msg = encoder(array, HEADER)

    height, width = array.shape[:2]
    assert (msg.encoding, msg.height, msg.width, msg.is_bigendian) == (encoding, height, width, 0)
    assert msg.step == width * channels * np.dtype(dtype).itemsize
    assert msg.header == HEADER
    # expected bytes from Python values, row by row: no numpy stride or byte-order logic
    expected = np.array(array.tolist(), dtype=dtype).tobytes()
    assert len(msg.data) == msg.step * msg.height
    assert bytes(msg.data) == expected
    # the message owns its bytes: a caller reusing its array cannot change what is published
    array[...] = 0
    assert bytes(msg.data) == expected
    # and it survives the wire format rclpy publishes with, equal to a message built plainly
    plain = Image(
        header=HEADER,
        height=height,
        width=width,
        encoding=encoding,
        step=msg.step,
        data=expected,
    )
    assert deserialize_message(serialize_message(msg), Image) == plain == msg
    if name in ("rgb8", "mono8"):  # and decodes back to the same pixels
        rgb = values if name == "rgb8" else np.stack([values] * 3, axis=-1)
        np.testing.assert_array_equal(image_to_rgb8(msg), rgb)


@pytest.mark.parametrize(
    ("encoder", "array", "reason"),
    [
        (
            rgb8_to_image,
            np.zeros((4, 5, 3), np.float64),
            r"rgb8 needs a uint8 array, got .*float64",
        ),
        (rgb8_to_image, np.zeros((4, 5, 3), np.int8), r"rgb8 needs a uint8 array, got dtype int8"),
        (
            rgb8_to_image,
            np.zeros((4, 5), np.uint8),
            r"rgb8 needs an HxWx3 array, got shape \(4, 5\)",
        ),
        (rgb8_to_image, np.zeros((4, 5, 4), np.uint8), r"rgb8 needs an HxWx3 .* \(4, 5, 4\)"),
        (rgb8_to_image, np.zeros((0, 5, 3), np.uint8), r"rgb8 array has zero size"),
        (rgb8_to_image, [[[0, 0, 0]]], r"rgb8 needs a numpy array, got list"),
        (mono8_to_image, np.zeros((4, 5), bool), r"mono8 needs a uint8 array, got dtype bool"),
        (mono8_to_image, np.zeros((4, 5), np.uint16), r"mono8 needs a uint8 array"),
        (mono8_to_image, np.zeros((4, 5, 1), np.uint8), r"mono8 needs an HxW array"),
        (mono8_to_image, np.zeros((4, 0), np.uint8), r"mono8 array has zero size"),
        (mono16_to_image, np.zeros((4, 5), np.uint8), r"mono16 needs a uint16 array, got .*uint8"),
        (mono16_to_image, np.zeros((4, 5), np.int16), r"mono16 needs a uint16 array"),
        (
            mono16_to_image,
            np.zeros(20, np.uint16),
            r"mono16 needs an HxW array, got shape \(20,\)",
        ),
        (float32_to_image, np.zeros((4, 5), np.float64), r"32FC1 needs a float32 array"),
        (float32_to_image, np.zeros((4, 5), np.int32), r"32FC1 needs a float32 array"),
    ],
)
def test_encode_rejects(encoder, array, reason: str) -> None:
    with pytest.raises(ImageConversionError, match=reason):
        encoder(array, HEADER)


# --- which decoder runs: cv_bridge where it is importable and reliable, ours otherwise ---


def test_no_cv_bridge_means_our_converter() -> None:
    if importlib.util.find_spec("cv_bridge") is None:
        assert ic._BRIDGE is None


class FakeBridge:
    """Stands in for cv_bridge.CvBridge: records calls, returns or raises what it is told."""

    def __init__(self, result: object = None, error: Exception | None = None) -> None:
        self.result, self.error, self.calls = result, error, []

    def imgmsg_to_cv2(self, msg: Image, desired_encoding: str) -> object:
        self.calls.append(desired_encoding)
        if self.error is not None:
            raise self.error
        return self.result


BRIDGE_MARK = np.full((187, 251, 3), 42, np.uint8)


@pytest.mark.parametrize(
    ("bridge", "padding", "used"),
    [
        (FakeBridge(result=BRIDGE_MARK), 0, True),
        (FakeBridge(result=BRIDGE_MARK), 6, True),  # 6 = two whole bgr8 pixels of padding
        (FakeBridge(result=BRIDGE_MARK), 1, False),  # cv_bridge misreads partial-pixel padding
        (FakeBridge(error=RuntimeError("[8UC3] is not a color format")), 0, False),
        (FakeBridge(result=BRIDGE_MARK[..., 0]), 0, False),  # wrong shape
        (FakeBridge(result=BRIDGE_MARK.astype(np.uint16)), 0, False),  # wrong dtype
    ],
    ids=["tight", "whole-pixel-padding", "partial-pixel-padding", "raises", "shape", "dtype"],
)
def test_bridge_selection(
    monkeypatch: pytest.MonkeyPatch,
    photo: np.ndarray,
    bridge: FakeBridge,
    padding: int,
    used: bool,
) -> None:
    bridge.calls.clear()
    monkeypatch.setattr(ic, "_BRIDGE", bridge)
    rgb = image_to_rgb8(make_image(photo[..., ::-1], "bgr8", padding=padding))
    np.testing.assert_array_equal(rgb, BRIDGE_MARK if used else photo)
    assert bridge.calls == ([] if padding % 3 else ["rgb8"])


def test_bridge_never_sees_invalid_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    bridge = FakeBridge(result=BRIDGE_MARK)
    monkeypatch.setattr(ic, "_BRIDGE", bridge)
    with pytest.raises(ImageConversionError, match="fewer than step"):
        image_to_rgb8(Image(height=2, width=2, encoding="rgb8", step=6, data=bytes(11)))
    assert bridge.calls == []
