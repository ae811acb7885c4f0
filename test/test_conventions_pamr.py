"""PAMR as the official code has it, and where NACLIP / SCLIP run it: at the input size.

The reference is written from ``pamr.py`` of visinf/1-stage-wseg (shipped unchanged by NACLIP
and SCLIP): shift kernels applied with ``F.conv2d`` at each dilation on a replicate-padded
image, the standard deviation over the 9 taps of every dilation together, ``-|x_i - x_j| /
(1e-8 + 0.1 std)``, the channel mean, a softmax over the neighbours, then ``mask = sum(m * x)``
per iteration. The engine test follows NACLIP's ``predict``: logits upsampled to the input size
first, the guide is the normalised network input upsampled to the input size.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense.pamr import pamr, pamr_affinity, pamr_propagate


def shift_kernels(centre: float, others: float, with_centre: bool) -> torch.Tensor:
    """The 3x3 one-hot kernels of LocalAffinity (8, centre - neighbour), LocalAffinityCopy
    (8, neighbour) and LocalStDev (9, every tap)."""
    taps = [(r, c) for r in range(3) for c in range(3) if with_centre or (r, c) != (1, 1)]
    weight = torch.zeros(len(taps), 1, 3, 3)
    for index, (r, c) in enumerate(taps):
        weight[index, 0, 1, 1] += centre
        weight[index, 0, r, c] += others
    return weight


def local(x: torch.Tensor, kernel: torch.Tensor, dilations) -> torch.Tensor:
    """LocalAffinity.forward: (B, K, P * len(dilations), H, W)."""
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(out, dim=1).reshape(b, k, -1, h, w)


def official_pamr(image, mask, iterations=10, dilations=(8, 16)):
    difference = shift_kernels(1.0, -1.0, False)  # x_centre - x_neighbour
    copy = shift_kernels(0.0, 1.0, False)
    every = shift_kernels(0.0, 1.0, True)
    std = local(image, every, dilations).std(2, keepdim=True)
    x = -local(image, difference, dilations).abs() / (1e-8 + 0.1 * std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(iterations):
        mask = (local(mask, copy, dilations) * x).sum(2)
    return mask


def test_affinity_and_propagation_are_the_official_pamr(voc_rgb):
    rgb = torch.from_numpy(voc_rgb[0][100:196, 150:278].copy()).permute(2, 0, 1)[None].float()
    image = (rgb / 255 - 0.45) / 0.27
    torch.manual_seed(0)
    scores = F.interpolate(torch.randn(1, 5, 6, 8), size=image.shape[-2:], mode="bilinear")
    want = official_pamr(image, scores)
    torch.testing.assert_close(pamr(image, scores), want, rtol=1e-4, atol=1e-5)
    affinity = pamr_affinity(image)
    assert affinity.shape == (1, 16, 96, 128)
    torch.testing.assert_close(pamr_propagate(affinity, scores), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        pamr_propagate(affinity, scores, iterations=1, dilations=(8, 16)),
        official_pamr(image, scores, iterations=1),
        rtol=1e-4,
        atol=1e-5,
    )


def test_propagate_refuses_a_mismatched_affinity():
    with pytest.raises(ValueError, match="need the same N, H, W"):
        pamr_propagate(torch.rand(1, 16, 8, 8), torch.rand(1, 3, 8, 9))


def naclip_predict(segmenter, rgb):
    """NACLIP's ``predict`` with PAMR on this engine's patch logits (whole image): logits to
    the resized size, to the input size, PAMR guided by the input upsampled, then softmax."""
    size = rgb.shape[:2]
    with torch.inference_mode():
        pixels = segmenter.method.preprocess(rgb)
        encoded = segmenter.method.encode(pixels)
        logits = segmenter.method.head(encoded)[0]
        logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear")
        logits = F.interpolate(logits, size=size, mode="bilinear")
        guide = F.interpolate(pixels.float(), size=size, mode="bilinear")
        refined = official_pamr(guide, logits)[0]
        probs = torch.softmax(segmenter.config.dense.logit_scale * refined, dim=0)
        owner = segmenter.method._query_owner
        per_class = torch.stack([probs[owner == c].amax(0) for c in range(len(segmenter.classes))])
    return per_class.argmax(0).numpy(), refined


def test_engine_runs_pamr_at_the_input_size(voc_rgb):
    torch.manual_seed(0)
    config = EngineConfig.from_flat(
        {
            "model": str(TINY_VIT),
            "pretrained": "none",
            "device": "cpu",
            "short_side": 64,
            "templates": "single",
            "dense.pamr": True,
        }
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(["person", "tv; monitor", "dog", "cat", "chair"])
    rgb = voc_rgb[2]
    want, _ = naclip_predict(segmenter, rgb)
    got = segmenter.segment(rgb).labels
    assert (got == want).mean() > 0.9999  # float rounding at exact ties only
    # the order matters: PAMR at the resized size, then upsampled, labels another map
    with torch.inference_mode():
        encoded = segmenter.method.encode(segmenter.method.preprocess(rgb))
        resized = segmenter.method.to_image(segmenter.method.head(encoded)[0], encoded, jbu=False)
        early = pamr(segmenter.method._full_resolution(encoded), resized[None])[0]
        early = F.interpolate(early[None], size=rgb.shape[:2], mode="bilinear")[0]
        owner = segmenter.method._query_owner
        per_class = torch.stack([early[owner == c].amax(0) for c in range(5)])
    changed = (per_class.argmax(0).numpy() != want).mean()
    assert changed > 0.005, changed
    assert len(np.unique(want)) > 1
