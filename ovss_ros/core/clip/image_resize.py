"""The network input of a frame: its bounded size (``resized_size``, as mmcv's ``rescale_size``)
and OpenCV's bilinear resize of uint8 images to it, bit for bit, in torch (so it runs on the
GPU too).

The official NACLIP / SCLIP / ClearCLIP test pipelines resize the uint8 image with mmcv's
``imrescale``, i.e. ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)``: no antialiasing, and
OpenCV's fixed-point arithmetic. A float bilinear resize rounds differently in about 12% of the
values (by one grey level); an antialiased one differs by up to 80 grey levels when shrinking.
This module repeats OpenCV's integer steps (``imgproc/src/resize.cpp``: ``resizeGeneric_`` with
``HResizeLinear`` and the vectorised ``VResizeLinearVec_32s8u``), so that on a GPU the network
sees the same bytes as the official pipeline without a round trip to the host. On the CPU the
engine calls OpenCV itself (0.7 ms instead of about 120 ms for 640x480 -> 448x597 here).
"""

from __future__ import annotations

import torch


def resized_size(
    height: int, width: int, short_side: int, patch: int, *, max_long_side: int
) -> tuple[int, int]:
    """Network input size (H', W') of a ``height`` x ``width`` image.

    mmcv's ``rescale_size`` with ``scale = (max_long_side, short_side)``, as the official NACLIP /
    SCLIP / ClearCLIP test pipelines (``Resize(scale=(2048, S), keep_ratio=True)``):
    ``s = min(short_side / short, max_long_side / long)`` (``short_side`` 0: 1 instead of the
    first term), each side ``int(side * s + 0.5)`` (338x500 at 336 -> 336x497), not rounded to
    whole patches: windows need no rounding, and a whole-image forward drops the remainder in
    its patch embedding. Bounds: no side longer than ``max_long_side``, none below one patch (a
    1x100000 strip at patch 16 becomes 16 x 2048), so the forward stays bounded for any frame.
    """
    long, short = max(height, width), min(height, width)
    scale = short_side / short if short_side else 1.0
    scale = min(scale, max_long_side / long)
    cap = max(patch, max_long_side)
    return (
        min(cap, max(patch, int(height * scale + 0.5))),
        min(cap, max(patch, int(width * scale + 0.5))),
    )


COEF_BITS = 11  # INTER_RESIZE_COEF_BITS: weights are fixed-point numbers scaled by 2048
COEF_SCALE = 1 << COEF_BITS


def _axis_taps(
    source: int, target: int, clamp_weights: bool, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Source indices (i0, i1) and fixed-point weights (w0, w1), each (target,) int32.

    OpenCV maps target pixel d to ``f = (float)((d + 0.5) * scale - 0.5)`` (computed in double,
    stored as float32) with ``scale = 1 / (target / source)``; the weights of pixels floor(f)
    and floor(f) + 1 are ``cvRound((1 - frac) * 2048)`` and ``cvRound(frac * 2048)``. Along x
    it moves taps beyond the border onto the edge pixel with weight (2048, 0); along y it only
    clamps the row indices and keeps the weights (``clamp_weights`` False).
    """
    scale = 1.0 / (target / source)
    position = ((torch.arange(target, dtype=torch.float64) + 0.5) * scale - 0.5).float()
    start = torch.floor(position)
    fraction = position - start
    start = start.long()
    if clamp_weights:
        outside = (start < 0) | (start >= source - 1)
        fraction[outside] = 0.0
        start = torch.where(start < 0, 0, torch.where(start >= source - 1, source - 1, start))
    # torch.round rounds half to even, as cvRound (lrint) does
    w0 = torch.round((1.0 - fraction) * COEF_SCALE).int()
    w1 = torch.round(fraction * COEF_SCALE).int()
    i0, i1 = start.clamp(0, source - 1), (start + 1).clamp(0, source - 1)
    return tuple(t.to(device) for t in (i0, i1, w0, w1))


def opencv_bilinear_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` of a uint8 image.

    ``image``: (H, W, C) uint8 on any device; ``size``: (h, w) >= 1. Returns (h, w, C) uint8
    on the same device. Rows are filtered first (integer sums scaled by 2048), then columns
    with OpenCV's vectorised rounding ``((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16)``,
    plus 2, shifted right by 2. Equal to OpenCV 4/5 on the tested shapes (test_image_resize.py);
    int32 throughout, no value exceeds 2**27. Raises ValueError for a bad image or size.
    """
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) uint8 tensor, got {image.dtype} {image.shape}")
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"target size must be at least 1x1, got {size}")
    x0, x1, a0, a1 = _axis_taps(image.shape[1], width, True, image.device)
    y0, y1, b0, b1 = _axis_taps(image.shape[0], height, False, image.device)
    pixels = image.to(torch.int32)
    rows = pixels[:, x0] * a0[:, None] + pixels[:, x1] * a1[:, None]  # (H, w, C), x 2048
    top, bottom = rows[y0] >> 4, rows[y1] >> 4
    out = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
    return ((out + 2) >> 2).clamp_(0, 255).to(torch.uint8)
