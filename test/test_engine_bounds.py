"""Every frame's network input is bounded before anything is allocated (``max_long_side``).

Only the short side used to be scaled: a 16x1 frame at ViT-B-16 / short side 448 became a
7168x448 input (12544 patches, 7.5 GB of attention). Now the long side never exceeds
``max_long_side``; wide and tall strips, single pixels and 100000-pixel lines give labels of
their own size from a small network input.
"""

import argparse

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_VIT

from ovss_ros.cli.engine_args import add_engine_arguments, config_from_args
from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.config import MAX_LONG_SIDE_LIMIT, MAX_WINDOWS
from ovss_ros.core.segmenter import resized_size


def mmcv_rescale(height: int, width: int, short_side: int, max_long_side: int):
    """mmcv.rescale_size((w, h), (max_long_side, short_side)), from mmcv/image/geometric.py:
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w)), then
    _scale_size: int(w * scale + 0.5), int(h * scale + 0.5)."""
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * float(scale) + 0.5), int(width * float(scale) + 0.5)


@pytest.mark.parametrize(
    ("size", "short_side", "max_long_side", "network"),
    [
        ((338, 500), 336, 2048, (336, 497)),  # the example (was 336 x 496)
        ((375, 500), 336, 2048, (336, 448)),
        ((480, 640), 448, 2048, (448, 597)),  # short side rules: 640 * 448/480 = 597.3
        ((1080, 3840), 448, 1792, (448, 1593)),  # 3840 * 0.4148 = 1592.9
        ((1080, 5760), 448, 1792, (336, 1792)),  # long side rules: scale 1792/5760
        ((16, 1), 448, 1792, (1792, 112)),  # was (7168, 448) before max_long_side
        ((16, 1), 448, 2048, (2048, 128)),
        ((4, 1), 448, 1792, (1792, 448)),
        ((1, 100000), 448, 2048, (16, 2048)),  # at least one patch on the short side
        ((100000, 1), 448, 2048, (2048, 16)),
        ((1, 1), 448, 2048, (448, 448)),
        ((3000, 4000), 0, 2048, (1536, 2048)),  # short_side 0 keeps the size unless too long
        ((1, 1000), 448, 1816, (16, 1816)),
        ((10, 10), 448, 8, (16, 16)),  # below one patch: one patch
    ],
)
def test_resized_size(size, short_side, max_long_side, network):
    assert resized_size(*size, short_side, 16, max_long_side=max_long_side) == network


def test_every_shape_stays_within_the_bound_and_follows_mmcv():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        height, width = np.exp(rng.uniform(0, np.log(200000), size=2)).astype(int) + 1
        patch = int(rng.choice([14, 16, 32]))
        short_side = int(rng.choice([0, 224, 336, 448, 560]))
        max_long_side = int(rng.integers(patch, 4097))
        out = resized_size(height, width, short_side, patch, max_long_side=max_long_side)
        for side in out:
            assert patch <= side <= max_long_side, (height, width, out)
        if short_side == 0:  # kept size (scale at most 1): no mmcv counterpart
            continue
        want = mmcv_rescale(height, width, short_side, max_long_side)
        if min(want) >= patch:  # mmcv's own size unless a side is below one patch
            assert out == want, (height, width, short_side, max_long_side)


def test_default_bound_for_the_default_model():
    """ViT-B-16 at short side 448: no frame shape gives more patches than a 448x2048 frame."""
    config = EngineConfig()
    shapes = [(16, 1), (4, 1), (1, 16), (1, 1), (1, 100000), (480, 640), (2160, 3840)]
    for height, width in shapes:
        h, w = resized_size(height, width, config.short_side, 16, max_long_side=2048)
        assert (h // 16) * (w // 16) <= (448 // 16) * (2048 // 16), (height, width)
    assert config.max_long_side == 2048


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT),
        pretrained="none",
        device="cpu",
        short_side=64,
        max_long_side=256,
        templates="single",
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(["person", "tv; monitor", "dog"])
    return segmenter


def network_inputs(segmenter, images):
    """Segment ``images``; return the results and the shapes the patch embedding saw."""
    shapes = []
    hook = segmenter.clip.model.visual.conv1.register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape))
    )
    try:
        return segmenter.segment_many(images), shapes
    finally:
        hook.remove()


def strip(voc_rgb, height, width):
    """A real photo squeezed into ``height`` x ``width``."""
    return cv2.resize(voc_rgb[0], (width, height), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize(
    ("size", "network"),
    [
        ((1, 5000), (16, 256)),
        ((5000, 1), (256, 16)),
        ((100000, 1), (256, 16)),
        ((1, 100000), (16, 256)),
        ((1, 1), (64, 64)),
        ((16, 1), (256, 16)),
        ((4, 1), (256, 64)),
        ((3, 700), (16, 256)),
        ((1, 257), (16, 256)),
        ((480, 640), (64, 85)),
    ],
)
def test_strips_get_bounded_inputs_and_labels_of_their_size(segmenter, voc_rgb, size, network):
    rgb = strip(voc_rgb, *size)
    assert segmenter.method.network_size(*size) == network
    (seg,), shapes = network_inputs(segmenter, [rgb])
    assert shapes == [(1, 3, *network)]
    assert seg.labels.shape == size and seg.confidence.shape == size
    assert set(np.unique(seg.labels)) <= {0, 1, 2}
    assert np.isfinite(seg.confidence).all()


@pytest.mark.parametrize(
    "changes",
    [
        {"dense.crop": 32, "dense.stride": 16},
        {"refinement": "dslo"},
        {"dense.pamr": True, "dense.upsample": "jbu"},
    ],
    ids=["windows", "dslo", "pamr+jbu"],
)
def test_strips_through_windows_and_refinements(segmenter, voc_rgb, changes):
    base = {name: segmenter.config.flat()[name] for name in changes}
    segmenter.reconfigure(**changes)
    try:
        for size in [(1, 5000), (5000, 1), (1, 1)]:
            seg = segmenter.segment(strip(voc_rgb, *size))
            assert seg.labels.shape == size
    finally:
        segmenter.reconfigure(**base)


def test_strips_of_one_network_size_share_a_forward(segmenter, voc_rgb):
    images = [strip(voc_rgb, 1, 5000), strip(voc_rgb, 2, 9000), strip(voc_rgb, 5000, 1)]
    assert segmenter.batch_groups(images) == [[0, 1], [2]]
    many, shapes = network_inputs(segmenter, images)
    assert shapes == [(2, 3, 16, 256), (1, 3, 256, 16)]
    for rgb, seg in zip(images, many, strict=True):
        np.testing.assert_array_equal(seg.labels, segmenter.segment(rgb).labels)


def test_max_long_side_changes_at_runtime(segmenter, voc_rgb):
    rgb = strip(voc_rgb, 1, 5000)
    segmenter.reconfigure(max_long_side=128)
    try:
        assert network_inputs(segmenter, [rgb])[1] == [(1, 3, 16, 128)]
    finally:
        segmenter.reconfigure(max_long_side=256)


@pytest.mark.parametrize("value", [0, -16, MAX_LONG_SIDE_LIMIT + 1])
def test_max_long_side_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="max_long_side must be in"):
        EngineConfig(max_long_side=value).validate()


def test_max_long_side_limits_are_accepted():
    EngineConfig(max_long_side=1).validate()  # model-independent; the model needs a patch
    EngineConfig(max_long_side=MAX_LONG_SIDE_LIMIT).validate()


def test_max_long_side_below_one_patch_is_refused_for_the_model():
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", max_long_side=8)
    with pytest.raises(ValueError, match="below one patch of the model \\(16 px\\)"):
        Segmenter(config)


def test_command_line_flag():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert config_from_args(parser.parse_args([])).max_long_side == 2048
    config = config_from_args(parser.parse_args(["--max-long-side", "1024", "--size", "336"]))
    assert (config.max_long_side, config.short_side) == (1024, 336)


@pytest.mark.parametrize(
    ("settings", "windows"),
    [
        (
            {"short_side": 336, "dense.crop": 224, "dense.stride": 112},
            2 * 18,
        ),  # the standard protocol
        ({"short_side": 560, "dense.crop": 224, "dense.stride": 112}, 4 * 18),  # Cityscapes
        ({"short_side": 448, "dense.crop": 448, "dense.stride": 224}, 1 * 9),  # ClearCLIP
        (
            {"short_side": 0, "dense.crop": 224, "dense.stride": 112},
            18 * 18,
        ),  # kept size, up to 2048
        ({"short_side": 448, "dense.crop": 224}, 3 * 18),  # stride 0 = crop / 2
        ({"short_side": 448}, 1),  # whole image
    ],
)
def test_window_counts_within_the_limit(settings, windows):
    config = EngineConfig.from_flat(settings)
    config.validate()
    assert config.max_windows() == windows <= MAX_WINDOWS


@pytest.mark.parametrize(
    ("settings", "windows"),
    [
        (
            {"dense.crop": 448, "dense.stride": 1},
            1601,
        ),  # a one-pixel stride: 1601 forwards of 784 patches
        ({"dense.crop": 16, "dense.stride": 8}, 255 * 55),  # a one-patch crop
        ({"short_side": 0, "dense.crop": 64, "dense.stride": 32}, 63 * 63),
    ],
)
def test_too_many_windows_are_refused(settings, windows):
    with pytest.raises(ValueError, match=f"needs up to {windows} sliding windows"):
        EngineConfig.from_flat(settings).validate()


def test_window_count_matches_the_engine(segmenter, voc_rgb):
    """The bound counts what the engine builds: a frame at the size limits, tiny model."""
    segmenter.reconfigure({"dense.crop": 32, "dense.stride": 16})
    try:
        rgb = strip(voc_rgb, 128, 512)  # network input 64 x 256: at both limits
        assert segmenter.method.network_size(128, 512) == (64, 256)
        (seg,), shapes = network_inputs(segmenter, [rgb])
        assert shapes == [(segmenter.config.max_windows(), 3, 32, 32)] == [(3 * 15, 3, 32, 32)]
        assert seg.labels.shape == (128, 512)
    finally:
        segmenter.reconfigure({"dense.crop": 0, "dense.stride": 0})
