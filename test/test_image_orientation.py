"""Compressed images and image files come out in their stored pixel grid, whatever the EXIF /
TIFF Orientation tag says, as image_transport and camera_info see them (and as the ground-truth
masks of data sets are stored).

Each file is written here by Pillow from a real VOC crop of 64x48 pixels with the tag set to 1..8;
the expected pixels are the crop itself for lossless formats, and for lossy ones the same encoder's
output without the tag (the tag does not change the coded pixels, so the decode must be equal).
"""

import io

import numpy as np
import pytest
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage

from ovss_ros.ros.image_conversion import compressed_to_rgb8, image_file_to_rgb8

# Pillow format -> save options; lossless ones must decode to the crop exactly.
FORMATS = {
    "JPEG": ({"quality": 95}, False),
    "PNG": ({}, True),
    "WEBP": ({"lossless": True}, True),
    "TIFF": ({}, True),  # libtiff applies the tag inside OpenCV's reader: undone by the module
}
ORIENTATION = 0x0112  # EXIF / TIFF tag 274


@pytest.fixture(scope="module")
def stored(voc_rgb) -> np.ndarray:
    """64 wide, 48 high: a transposed result cannot pass for the stored grid."""
    crop = np.ascontiguousarray(voc_rgb[1][100:148, 200:264])
    assert crop.shape == (48, 64, 3) and crop.std() > 20
    return crop


def encode(rgb: np.ndarray, image_format: str, orientation: int | None) -> bytes:
    options, _ = FORMATS[image_format]
    image = PILImage.fromarray(rgb)
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, image_format, **options)
    elif image_format == "TIFF":
        image.save(buffer, image_format, tiffinfo={ORIENTATION: orientation}, **options)
    else:
        exif = PILImage.Exif()
        exif[ORIENTATION] = orientation
        image.save(buffer, image_format, exif=exif.tobytes(), **options)
    data = buffer.getvalue()
    if orientation is not None:  # the tag really is in the file
        assert PILImage.open(io.BytesIO(data)).getexif().get(ORIENTATION) == orientation
    return data


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("image_format", FORMATS)
def test_compressed_image_keeps_stored_grid(stored, image_format, orientation, tmp_path):
    _, lossless = FORMATS[image_format]
    tagged = encode(stored, image_format, orientation)
    expected = (
        stored
        if lossless
        else compressed_to_rgb8(
            CompressedImage(format=image_format.lower(), data=encode(stored, image_format, None))
        )
    )
    rgb = compressed_to_rgb8(CompressedImage(format=image_format.lower(), data=tagged))
    assert rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(rgb, expected)

    path = tmp_path / f"photo.{image_format.lower()}"
    path.write_bytes(tagged)
    np.testing.assert_array_equal(image_file_to_rgb8(path), expected)


def test_orientation_6_of_the_issue(stored):
    """The issue's example: a 64x48 JPEG with Orientation 6 gave 48x64 pixels."""
    data = encode(stored, "JPEG", 6)
    assert compressed_to_rgb8(CompressedImage(format="jpeg", data=data)).shape[:2] == (48, 64)
