"""Which text queries can win a pixel, decided on the patch grid (exact pruning of the argmax).

Every upsampling step of the dense post-processing is a convex combination of patch values with
weights shared by all queries: bilinear (``F.interpolate``, ``align_corners=False``, clamped at
the edges), joint bilateral upsampling (softmax weights, ``jbu.py``) and PAMR (softmax weights,
``pamr.py``). So the full-resolution logit of query q at pixel p lies between the smallest and
the largest patch logit of q in p's support, and a query whose largest patch value near p is
below another query's smallest patch value near p cannot be the argmax at p.

Support of a pixel of the input image, in patch cells around the cell c(p) that holds it (one
window covering the whole resized image; sliding windows take the old path):

* bilinear patch -> resized image -> input: the resized pixels p reads are within one resized
  pixel of p, each reads the 2x2 patches around it, so within c(p) +- 2 (radius 2);
* JBU: a resized pixel reads the 5x5 patches around its own cell (``radius`` 2 of ``jbu.py``),
  so radius 3;
* PAMR: 10 iterations of 3x3 taps at dilations up to 16 input pixels move the support by up to
  160 input pixels, i.e. ``ceil(160 / pixels per cell) + 1`` more cells on each side.

Float rounding: the computed maps are a convex combination up to a few float32 roundings per
step (at most a few hundred ulps of the largest value through PAMR's 10 rounds); ``MARGIN``
(1e-3 of the largest scaled logit) covers that many times over, so a query is dropped only
when it is below the winner by far more than rounding can explain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MARGIN = 1e-3  # of the largest |scaled logit|: float rounding slack of the bounds
PAMR_REACH = 10 * 16  # input pixels: PAMR's iterations x its largest dilation


def support_radius(size: tuple[int, int], grid: tuple[int, int], jbu: bool, pamr: bool) -> int:
    """Patch cells around a pixel's own cell that can reach it (see the module docstring).

    ``size``: the input (H, W); ``grid``: the patch grid (h, w) of the single window."""
    radius = 3 if jbu else 2
    if pamr:
        cell = min(size[0] / grid[0], size[1] / grid[1])  # input pixels per patch cell
        radius += math.ceil(PAMR_REACH / cell) + 1
    return radius


def candidate_queries(
    scaled: torch.Tensor, radius: int, banned: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (ascending, long) of the queries that can be the argmax somewhere.

    ``scaled``: (Q, h, w) scaled patch logits of the class queries; ``radius``: the support
    radius in cells (``support_radius``); ``banned``: (Q,) bool, queries that may not win (they
    are neither candidates nor set the bar). Per cell c: upper[q] = max of q over the
    (2 radius + 1)^2 cells around c, lower[q] = min; a query is kept if upper[q] >= max over
    allowed r of lower[r] - margin at some cell. Exact: a dropped query is below the best
    allowed query at every pixel (module docstring)."""
    queries, height, width = scaled.shape
    allowed = torch.ones(queries, dtype=torch.bool, device=scaled.device)
    if banned is not None:
        allowed &= ~banned
    if not bool(allowed.any()):
        return torch.zeros(0, dtype=torch.long, device=scaled.device)
    radius = min(radius, max(height, width))
    kernel = 2 * radius + 1
    upper = _max_pool(scaled, kernel, radius)
    lower = -_max_pool(-scaled[allowed], kernel, radius)
    bar = lower.amax(dim=0) - MARGIN * float(scaled.abs().amax())
    keep = (upper >= bar).flatten(1).any(dim=1) & allowed
    return keep.nonzero().flatten()


def _max_pool(maps: torch.Tensor, kernel: int, radius: int) -> torch.Tensor:
    """(Q, h, w) max over the kernel x kernel cells around each cell (edges: the cells there),
    as ``F.max_pool2d(maps, kernel, 1, radius)``, by a column pass and a row pass (a max is
    the same whichever way it is grouped: 2 kernel instead of kernel^2 reads a cell)."""
    columns = F.max_pool2d(maps[None], (kernel, 1), stride=1, padding=(radius, 0))
    return F.max_pool2d(columns, (1, kernel), stride=1, padding=(0, radius))[0]
