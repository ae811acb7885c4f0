"""Every input image is bounded by its declared size before anything is decoded or allocated.

The bombs are real files written here: a valid 1-bit PNG of 12000x12000 zero pixels (17.6 KB, the
file of the issue: 78 s and 14.7 GB before the limit) streamed through zlib row by row, and a JPEG
whose SOF0 marker declares more pixels than its data holds (libjpeg fills the rest, so the full
declared size is allocated). Smaller versions of the same files are decoded to show that the
generators make images that really decode to their declared size. That nothing is decoded when a
bomb is refused is shown by allocation: tracemalloc sees numpy's (and so OpenCV's) output arrays.
"""

import struct
import tracemalloc
import warnings
import zlib

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from ovss_ros.ros.image_conversion import (
    DEFAULT_MAX_INPUT_PIXELS,
    ImageConversionError,
    ImageTooLarge,
    compressed_to_rgb8,
    image_file_to_rgb8,
    image_to_rgb8,
)

# A refused bomb may allocate the header's bookkeeping, never a pixel buffer: 1 MiB is far below
# the 432 MB (12000x12000x3) or 243 MB (9000x9000x3) that decoding would allocate.
REFUSAL_ALLOCATION_LIMIT = 1 << 20


def png_1bit(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of zeros; memory stays at one row whatever the size."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    stream = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then width bits of zeros
    idat = b"".join(stream.compress(row) for _ in range(height)) + stream.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def small_jpeg(voc_rgb) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(voc_rgb[0][:64, :64], cv2.COLOR_RGB2BGR))[1].tobytes()


def jpeg_bomb(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its baseline SOF0 marker declaring ``width`` x ``height``."""
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def allocation_peak(function, *args, **kwargs) -> tuple[BaseException | None, int]:
    """(exception raised or None, bytes allocated at the peak of the call above its start)."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            function(*args, **kwargs)
            error = None
        except Exception as raised:
            error = raised
        return error, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_default_limit_takes_8k_and_refuses_the_issue_png():
    assert 8192 * 4320 <= DEFAULT_MAX_INPUT_PIXELS < 12000 * 12000


def test_png_bomb_of_the_issue_is_refused_from_its_header():
    bomb = png_1bit(12000, 12000)
    assert len(bomb) < 18_000  # a tiny file: the issue's was 17.6 KB
    message = CompressedImage(format="png", data=bomb)
    error, peak = allocation_peak(compressed_to_rgb8, message)
    assert isinstance(error, ImageTooLarge) and isinstance(error, ImageConversionError)
    assert (error.width, error.height, error.max_pixels) == (12000, 12000, 40_000_000)
    assert str(error) == (
        f"compressed image data ({len(bomb)} bytes, format 'png') declares 12000x12000 = "
        "144000000 pixels, more than max_input_pixels = 40000000"
    )
    assert peak < REFUSAL_ALLOCATION_LIMIT, f"{peak} bytes allocated: something was decoded"


def test_png_generator_makes_real_images():
    """The same generator at 1200x1200 decodes to 1200x1200 black pixels: the bomb is real."""
    message = CompressedImage(format="png", data=png_1bit(1200, 1200))
    rgb, peak = compressed_to_rgb8(message), allocation_peak(compressed_to_rgb8, message)[1]
    assert rgb.shape == (1200, 1200, 3) and not rgb.any()
    assert peak >= rgb.nbytes  # the measure sees OpenCV's output (so a decoded bomb would show)


def test_jpeg_bomb_is_refused_from_its_header(small_jpeg):
    declared_small = jpeg_bomb(small_jpeg, 2000, 1500)
    rgb = compressed_to_rgb8(CompressedImage(format="jpeg", data=declared_small))
    assert rgb.shape == (1500, 2000, 3)  # 1.6 KB of data become what the header declares

    bomb = jpeg_bomb(small_jpeg, 9000, 9000)
    error, peak = allocation_peak(compressed_to_rgb8, CompressedImage(format="jpeg", data=bomb))
    assert isinstance(error, ImageTooLarge) and (error.width, error.height) == (9000, 9000)
    assert "declares 9000x9000 = 81000000 pixels, more than max_input_pixels = 40000000" in str(
        error
    )
    assert peak < REFUSAL_ALLOCATION_LIMIT


def test_image_file_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_1bit(12000, 12000))
    error, peak = allocation_peak(image_file_to_rgb8, path)
    assert isinstance(error, ImageTooLarge)
    assert str(error) == (
        "image declares 12000x12000 = 144000000 pixels, more than max_input_pixels = 40000000"
    )
    assert peak < REFUSAL_ALLOCATION_LIMIT


def test_compressed_and_file_limit_is_inclusive(voc_rgb, tmp_path):
    height, width = voc_rgb[0].shape[:2]
    bgr = cv2.cvtColor(voc_rgb[0], cv2.COLOR_RGB2BGR)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), bgr)
    message = CompressedImage(format="png", data=path.read_bytes())
    for convert, source in ((compressed_to_rgb8, message), (image_file_to_rgb8, path)):
        np.testing.assert_array_equal(convert(source, max_pixels=width * height), voc_rgb[0])
        with pytest.raises(ImageTooLarge, match=f"declares {width}x{height} = {width * height}"):
            convert(source, max_pixels=width * height - 1)


def raw_message(rgb: np.ndarray, encoding: str = "rgb8") -> Image:
    height, width = rgb.shape[:2]
    return Image(height=height, width=width, encoding=encoding, step=width * 3, data=rgb.tobytes())


def test_raw_image_limit_is_inclusive(voc_rgb):
    rgb = voc_rgb[0]
    height, width = rgb.shape[:2]
    message = raw_message(rgb)
    np.testing.assert_array_equal(image_to_rgb8(message, max_pixels=width * height), rgb)
    with pytest.raises(ImageTooLarge) as refused:
        image_to_rgb8(message, max_pixels=width * height - 1)
    assert (refused.value.width, refused.value.height) == (width, height)
    assert str(refused.value) == (
        f"rgb8 image declares {width}x{height} = {width * height} pixels, more than "
        f"max_input_pixels = {width * height - 1}"
    )


@pytest.mark.parametrize("encoding", ["rgb8", "mono16", "bgra16"])
def test_raw_image_over_the_limit_is_refused_before_its_data(encoding):
    """A header declaring 12000x12000 is refused for its size, not for its missing data."""
    message = Image(height=12000, width=12000, encoding=encoding, step=12000 * 8, data=b"\0" * 64)
    error, peak = allocation_peak(image_to_rgb8, message)
    assert isinstance(error, ImageTooLarge)
    assert str(error).startswith(f"{encoding} image declares 12000x12000 = 144000000 pixels")
    assert peak < REFUSAL_ALLOCATION_LIMIT


def test_raw_image_data_shorter_than_declared_is_still_refused():
    message = Image(height=100, width=100, encoding="rgb8", step=300, data=b"\0" * 29_999)
    with pytest.raises(ImageConversionError, match="data has 29999 bytes, fewer than step"):
        image_to_rgb8(message)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_limit_is_a_caller_error(bad, voc_rgb, tmp_path):
    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), voc_rgb[0])
    calls = [
        (image_to_rgb8, raw_message(voc_rgb[0])),
        (compressed_to_rgb8, CompressedImage(format="jpeg", data=path.read_bytes())),
        (image_file_to_rgb8, path),
    ]
    for convert, source in calls:
        with pytest.raises(ValueError, match="max_pixels must be a positive integer") as raised:
            convert(source, max_pixels=bad)
        assert not isinstance(raised.value, ImageConversionError)


def test_pillow_bomb_settings_neither_warn_nor_decide_below_its_error(monkeypatch):
    """Pillow's process-wide limits are lowered here so that a small image crosses them."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    warned = CompressedImage(format="png", data=png_1bit(40, 40))  # 1600: Pillow's warning zone
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked DecompressionBombWarning would raise here
        assert compressed_to_rgb8(warned).shape == (40, 40, 3)

    over = CompressedImage(format="png", data=png_1bit(64, 48))  # 3072: over Pillow's error
    with pytest.raises(ImageTooLarge, match="declares more than 2000 pixels, Pillow's") as refused:
        compressed_to_rgb8(over)
    assert refused.value.width is None and refused.value.max_pixels == DEFAULT_MAX_INPUT_PIXELS


def test_format_whose_size_cannot_be_read_is_refused():
    """Radiance HDR: OpenCV decodes it, Pillow cannot read its header, so it cannot be bounded."""
    hdr = cv2.imencode(".hdr", np.full((8, 8, 3), 0.5, np.float32))[1].tobytes()
    assert cv2.imdecode(np.frombuffer(hdr, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageConversionError, match="cannot read its size from the header"):
        compressed_to_rgb8(CompressedImage(format="hdr", data=hdr))


def test_image_file_that_is_no_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ImageConversionError, match="no image format recognised"):
        image_file_to_rgb8(path)
    with pytest.raises(FileNotFoundError):
        image_file_to_rgb8(tmp_path / "missing.png")
