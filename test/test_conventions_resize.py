"""Pre-processing as the official pipeline: mmcv's resize size, OpenCV's uint8 bilinear resize.

Official (NACLIP / SCLIP / ClearCLIP configs): ``LoadImageFromFile`` (uint8 BGR), ``Resize(scale=
(2048, S), keep_ratio=True)`` = ``mmcv.imrescale`` = ``cv2.resize(img, (w, h),
interpolation=cv2.INTER_LINEAR)`` at ``int(side * scale + 0.5)``, then ``SegDataPreProcessor``
((x - mean) / std per channel, in 0..255 units). The references here call OpenCV itself.
"""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.clip.image_resize import opencv_bilinear_resize


def cv2_linear(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def torch_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return opencv_bilinear_resize(torch.from_numpy(rgb), size).numpy()


@pytest.mark.parametrize("short", [224, 336, 448, 560, 1000])
def test_voc_photos_resize_bit_exactly_as_opencv(voc_rgb, short):
    for rgb in voc_rgb:
        h, w = rgb.shape[:2]
        scale = min(2048 / max(h, w), short / min(h, w))
        size = int(h * scale + 0.5), int(w * scale + 0.5)
        np.testing.assert_array_equal(torch_resize(rgb, size), cv2_linear(rgb, size))


def test_random_shapes_resize_bit_exactly_as_opencv():
    """Shrinking and enlarging, odd sizes, exact halves, single rows and columns."""
    rng = np.random.default_rng(0)
    shapes = [((2, 2), (1, 1)), ((1, 1), (5, 3)), ((1, 7), (4, 3)), ((100, 60), (50, 30))]
    shapes += [
        ((int(a), int(b)), (int(c), int(d))) for a, b, c, d in rng.integers(1, 400, (40, 4))
    ]
    for (h, w), size in shapes:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        if h > 8 and w > 8:  # photo-like smooth content, too
            image = cv2.GaussianBlur(image, (0, 0), 2)
        np.testing.assert_array_equal(
            torch_resize(image, size), cv2_linear(image, size), err_msg=f"{(h, w)} -> {size}"
        )


def test_float_resizes_differ_from_opencv(voc_rgb):
    """Guards the tests above: what the engine did before (float, antialiased) and a plain float
    bilinear resize both differ from OpenCV's bytes."""
    rgb = voc_rgb[1]
    size = (224, 299)
    want = cv2_linear(rgb, size).astype(int)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    for antialias in (True, False):
        out = F.interpolate(image, size=size, mode="bilinear", antialias=antialias)
        out = out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(int)
        assert (out != want).mean() > 0.05


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        opencv_bilinear_resize(torch.zeros(4, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="at least 1x1"):
        opencv_bilinear_resize(torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 2))


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", short_side=336)
    return Segmenter(config)


def test_preprocess_is_the_official_pipeline(segmenter, voc_rgb):
    """mmcv's size, OpenCV's bytes, then (x - 255 mean) / (255 std) as SegDataPreProcessor."""
    mean = 255 * torch.tensor(segmenter.clip.mean).view(3, 1, 1)
    std = 255 * torch.tensor(segmenter.clip.std).view(3, 1, 1)
    for rgb in voc_rgb:
        h, w = rgb.shape[:2]
        scale = min(2048 / max(h, w), 336 / min(h, w))
        size = int(h * scale + 0.5), int(w * scale + 0.5)
        resized = torch.from_numpy(cv2_linear(rgb, size)).permute(2, 0, 1).float()
        want = (resized - mean) / std
        got = segmenter.method.preprocess(rgb)
        assert got.shape == (1, 3, *size)
        torch.testing.assert_close(got[0], want, rtol=0, atol=1e-5)


def test_whole_image_logits_take_two_steps(segmenter, voc_rgb):
    """NACLIP's whole-image path: the patch grid drops the remainder (497 px = 31 patches + 1),
    its logits are stretched to the resized image (336x497), then upsampled to the input."""
    rgb = cv2.resize(voc_rgb[0], (500, 338), interpolation=cv2.INTER_AREA)
    segmenter.set_classes(["person", "dog", "chair"])
    with torch.inference_mode():
        pixels = segmenter.method.preprocess(rgb)
        assert pixels.shape[-2:] == (336, 497)
        encoded = segmenter.method.encode(pixels)
        logits = segmenter.method.head(encoded)[0]
        assert logits.shape[-2:] == (21, 31)
        resized = segmenter.method.to_image(logits, encoded, jbu=False)
        want = F.interpolate(logits, size=(336, 497), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(resized, want)
        got = segmenter.method._to_input(logits, encoded, (338, 500), True, None)
        two_steps = F.interpolate(want[None], size=(338, 500), mode="bilinear")[0]
        torch.testing.assert_close(got, two_steps)
        one_step = F.interpolate(logits, size=(338, 500), mode="bilinear")[0]
        assert (one_step - two_steps).abs().max() > 1e-3  # the order shows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_preprocess_equals_the_cpu_one(voc_rgb):
    """The GPU resizes on the device (opencv_bilinear_resize), the CPU with OpenCV: same bytes."""
    outputs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        config = EngineConfig(model=str(TINY_VIT), pretrained="none", device=device)
        outputs.append([Segmenter(config).preprocess(rgb).cpu() for rgb in voc_rgb])
    for cpu, gpu in zip(*outputs, strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-6)
