"""Joint bilateral upsampling (JBU; Kopf, Cohen, Lischinski & Uyttendaele, SIGGRAPH 2007).

Patch-level class scores are brought to image resolution by a weighted mean of the nearby
low-resolution scores, where a neighbour counts less the farther it is (spatial Gaussian, in
low-resolution pixels) and the more its colour differs from the high-resolution pixel's (range
Gaussian on the guide image). Unlike bilinear upsampling, which puts a class boundary anywhere
inside the 16-pixel patch that straddles it, JBU puts it on the colour edge.

JBU is the third step of DSLO (arXiv 2604.07723), whose JBU settings are not known here. The
defaults, spatial sigma 1 low-resolution pixel and range sigma 0.1 on RGB in [0, 1], are those
of M2N2 (CVPR 2025, robert-gabriel-gaube/m2n2, ``joint_bilateral_upsampling`` in
``src/utils.py``), which DSLO follows for its Markov chain. Departures from M2N2's version, ours:
M2N2 first upsamples the scores bilinearly and then filters in high-resolution pixels (a window
of 3 spatial sigmas, colour differences between high-resolution pixels); here, as in Kopf et
al., the window holds the (2 radius + 1)^2 low-resolution samples themselves, and a sample's
colour is the guide area-averaged over its patch (the colour the patch saw) rather than one
pixel of it. Tests: test/test_refine_jbu.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _low_res_coordinates(high: int, low: int, device: torch.device) -> torch.Tensor:
    """Where each high-resolution pixel centre lies in low-resolution pixel units.

    Same convention as ``F.interpolate(..., align_corners=False)``: pixel centres at +0.5.
    """
    return (torch.arange(high, device=device, dtype=torch.float32) + 0.5) * (low / high) - 0.5


def _taps(position: torch.Tensor, size: int, radius: int) -> list[tuple[torch.Tensor, ...]]:
    """Per offset along one axis: clamped neighbour index and its log spatial weight factor.

    Neighbours beyond the border get a log weight of -inf instead of a clamped duplicate, so a
    border pixel is not pulled towards the edge row by counting it several times.
    """
    centre = position.round().long()
    taps = []
    for offset in range(-radius, radius + 1):
        index = centre + offset
        inside = (index >= 0) & (index < size)
        distance = position - index
        log_weight = (-0.5 * distance.square()).masked_fill(~inside, float("-inf"))
        taps.append((index.clamp(0, size - 1), log_weight))
    return taps


@dataclass(frozen=True)
class JbuWeights:
    """The guide-dependent part of JBU, reusable for any number of score maps of one guide.

    ``weights`` (N, 2r+1, 2r+1, 1, H, W) normalised window weights; ``rows`` / ``cols`` the
    low-resolution neighbour index of each window offset along each axis; ``low_size`` (h, w).
    """

    weights: torch.Tensor
    rows: list[torch.Tensor]
    cols: list[torch.Tensor]
    low_size: tuple[int, int]


def jbu_weights(
    guide: torch.Tensor,
    low_size: tuple[int, int],
    sigma_spatial: float = 1.0,
    sigma_range: float = 0.1,
    radius: int = 2,
) -> JbuWeights:
    """Window weights of :func:`joint_bilateral_upsample` for ``guide`` (N, 3, H, W) in [0, 1]
    and score maps of ``low_size`` (h, w); they depend on the guide only, so a caller that
    upsamples many maps (a chunk of classes at a time) computes them once."""
    low_h, low_w = low_size
    high_h, high_w = guide.shape[-2:]
    guide = guide.float()
    guide_low = F.interpolate(guide, size=(low_h, low_w), mode="area")
    rows = _taps(_low_res_coordinates(high_h, low_h, guide.device), low_h, radius)
    cols = _taps(_low_res_coordinates(high_w, low_w, guide.device), low_w, radius)

    log_weights = []  # (N, H, W) per window offset
    for row, row_log in rows:
        for col, col_log in cols:
            neighbour_colour = guide_low.index_select(3, col).index_select(2, row)
            colour = (guide - neighbour_colour).square().sum(dim=1) / (2 * sigma_range**2)
            spatial = (row_log[:, None] + col_log[None, :]) / sigma_spatial**2
            log_weights.append(spatial - colour)
    weights = torch.softmax(torch.stack(log_weights, dim=1), dim=1)
    weights = weights.view(len(guide), len(rows), len(cols), 1, high_h, high_w)
    return JbuWeights(weights, [row for row, _ in rows], [col for col, _ in cols], (low_h, low_w))


def joint_bilateral_upsample(
    scores: torch.Tensor,
    guide: torch.Tensor,
    sigma_spatial: float = 1.0,
    sigma_range: float = 0.1,
    radius: int = 2,
    weights: JbuWeights | None = None,
) -> torch.Tensor:
    """Upsample ``scores`` (N, K, h, w) to the size of ``guide`` (N, 3, H, W, values in [0, 1]).

    Each high-resolution pixel p takes the weighted mean of the (2 radius + 1)^2 low-resolution
    scores around its low-resolution position, weights
    ``exp(-|p - q|^2 / 2 sigma_spatial^2) * exp(-|guide(p) - guide_low(q)|^2 / 2 sigma_range^2)``
    with |p - q| in low-resolution pixels and ``guide_low`` the guide area-averaged to (h, w),
    i.e. the colour that the patch q actually saw. The weights are normalised with a softmax
    over the window in log space, so a pixel whose colour matches none of its neighbours (a thin
    line lost in the patches) falls back to the closest colour instead of dividing 0 by 0.
    ``weights``: the same weights from :func:`jbu_weights` (``guide`` and the sigmas and radius
    are then not used); ValueError if they were made for another N, h, w.

    Vectorised over pixels; the loop is over the window's offsets only and each step touches
    (N, K, H, W) once, so memory stays at a few output-sized buffers (no (2r+1)^2 copies).
    Computed in float32, returned in ``scores.dtype``.
    """
    if scores.shape[0] != guide.shape[0]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and guide {tuple(guide.shape)} differ in N"
        )
    if weights is None:
        weights = jbu_weights(guide, scores.shape[-2:], sigma_spatial, sigma_range, radius)
    elif (
        weights.low_size != tuple(scores.shape[-2:]) or weights.weights.shape[0] != scores.shape[0]
    ):
        raise ValueError(
            f"JBU weights for {weights.weights.shape[0]} maps of {weights.low_size} do not fit "
            f"scores {tuple(scores.shape)}"
        )
    low = scores.float()
    high_h, high_w = weights.weights.shape[-2:]
    upsampled = torch.zeros(
        (*scores.shape[:2], high_h, high_w), device=low.device, dtype=torch.float32
    )
    for j, col in enumerate(weights.cols):
        # Columns first, at low resolution (N, K, h, W); then whole rows, which copy contiguously.
        low_cols = low.index_select(3, col)
        for i, row in enumerate(weights.rows):
            upsampled.addcmul_(weights.weights[:, i, j], low_cols.index_select(2, row))
    return upsampled.to(scores.dtype)
