"""The softmax's denominator of the queries that cannot win, by two matrix products per chunk.

Bilinear resizing with ``align_corners=False`` (``F.interpolate``, clamped at the edges) acts on
rows and columns separately and linearly, and so does a chain of two such resizes (patch grid
(h, w) -> window / resized image (H', W') -> input (H, W), as ``DensePostprocess._to_input``
without JBU or PAMR). The chain is then ``L = A_h @ Z @ A_w^T`` for a patch map Z (h, w), with
A_h (H, h) and A_w (W, w) the chain applied to the identity's columns by the same
``F.interpolate`` calls (``resize_matrices``: the library's own coefficients).

``exp_sum`` adds ``sum_q exp(logit_scale * L_q - peak)`` over a chunk of queries, one block of
output rows at a time: a GEMM gives the block's logits of every query of the chunk relative to
the resized maximum of the chunk's patch maps, which are exponentiated and summed in place; the
shift to the peak is one factor per pixel. No buffer exceeds ``POSTPROCESS_ELEMENTS`` (about
two such buffers at once, and one input-sized map of sums).
The cost is one GEMM of k x H x W x h multiply-adds plus one exp per query and pixel, instead of
two resizes writing two full-size maps per query.

Tolerance: the products round in a different order from ``F.interpolate``, so each term
differs from the resized maps' by a few float32 ulps; against float64 resizes a sum of 1200 such
terms is as close as today's float32 path (within 1.5x, a few 1e-6 relative), and the confidence
stays within 1e-6 relative of the float64 formula (test/test_postprocess_pruned.py: inputs
larger, smaller, odd, tall and the network input's own size). Labels never come from here:
the argmax keeps the resized maps (bit-identical labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovss_ros.core.frame_budget import POSTPROCESS_ELEMENTS
from ovss_ros.core.methods.dense.reduction import Reduced

BLOCK_ELEMENTS = POSTPROCESS_ELEMENTS  # float32 logits per row block (large GEMMs: fewer
# synchronisations of the threads, which a loaded machine makes costly)


def _chain(cells: int, middle: int, final: int) -> torch.Tensor:
    """(final, cells): bilinear cells -> middle -> final along one axis, from the identity."""
    eye = torch.eye(cells)[None, :, :, None]  # (1, cells, cells, 1): column i is a unit map
    step = F.interpolate(eye, size=(middle, 1), mode="bilinear", align_corners=False)
    if middle != final:
        step = F.interpolate(step, size=(final, 1), mode="bilinear", align_corners=False)
    return step[0, :, :, 0].T.contiguous()


def resize_matrices(
    grid: tuple[int, int], middle: tuple[int, int], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_h (H, h) and A_w (W, w), float32 on the CPU, with resize(resize(Z, middle), size) =
    A_h @ Z @ A_w^T for a patch map Z of shape ``grid`` (h, w).

    ``middle``: the window / resized image (H', W'); ``size``: the input (H, W). As
    ``_resize``, the second step is skipped when ``middle == size`` (a resize to the same size
    is the identity, so skipping it per axis gives the same matrices)."""
    if tuple(middle) == tuple(size):
        return _chain(grid[0], middle[0], middle[0]), _chain(grid[1], middle[1], middle[1])
    return _chain(grid[0], middle[0], size[0]), _chain(grid[1], middle[1], size[1])


def exp_sum(
    patch: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    scale: float,
    peak: torch.Tensor,
    total: torch.Tensor,
) -> None:
    """``total += sum_q exp(scale * (rows @ patch[q] @ columns^T) - peak)``, in place.

    ``patch``: (k, h, w) float32 patch logits; ``rows`` (H, h) / ``columns`` (W, w): from
    ``resize_matrices``, on ``patch``'s device; ``peak``, ``total``: (H, W) float32, ``peak``
    at least the largest map's value less ~80 (else exp overflows, as it would in float32).

    Each query's patch map is taken relative to ``top``, the cells' maximum over the k queries,
    so the GEMM gives ``scale * L_q - shift`` <= 0 straight away (``shift = scale * rows @ top
    @ columns^T``, the same resize of ``top``, >= every map: the weights are convex): no copy
    of the peak into each query's block, no overflow, and the products round at the size of
    the (small) distance to ``top`` rather than of the logits. ``shift - peak`` is added once
    per pixel, in float64, as the factor ``exp(shift - peak)`` of the block's sum.
    Queries go in chunks of at most ``POSTPROCESS_ELEMENTS / (h W)``, output rows in blocks of
    about ``BLOCK_ELEMENTS / (k W)``: each block is one batched GEMM, one in-place exp, one sum."""
    count, cells, _ = patch.shape
    height, width = peak.shape
    top = patch.amax(dim=0)  # (h, w)
    centred = patch - top  # <= 0: rounds at the distance to the top
    sums = torch.zeros_like(total)
    step = max(1, min(count, POSTPROCESS_ELEMENTS // (cells * width), BLOCK_ELEMENTS // width))
    scaled_rows = rows * scale
    for start in range(0, count, step):
        wide = torch.matmul(centred[start : start + step], columns.T)  # (k, h, W)
        k = wide.shape[0]
        block = max(1, BLOCK_ELEMENTS // (k * width))
        for first in range(0, height, block):
            part = scaled_rows[first : first + block]
            logits = torch.matmul(part.expand(k, *part.shape), wide)  # scale L_q - shift
            sums[first : first + block] += logits.exp_().sum(dim=0)
    top_wide = (top.double() @ columns.double().T) * scale  # (h, W)
    rows64 = rows.double()
    block = max(1, BLOCK_ELEMENTS // (2 * width))  # float64 rows: two floats each
    for first in range(0, height, block):
        shift = rows64[first : first + block] @ top_wide
        factor = torch.exp(shift - peak[first : first + block].double()).float()
        total[first : first + block] += factor * sums[first : first + block]


def add_denominator(
    logits: torch.Tensor,
    queries: torch.Tensor,
    middle: tuple[int, int],
    size: tuple[int, int],
    scale: float,
    reduced: Reduced,
) -> None:
    """Add ``exp(scale * map - peak)`` of ``queries`` (long, (k,)) to ``reduced.total``.

    ``logits``: (Q, h, w) patch logits of the single window; ``middle``: the window (H', W');
    ``size``: the input (H, W); ``reduced.peak`` must already be final (module docstring)."""
    patch = logits.index_select(0, queries.to(logits.device)).float()
    rows, columns = resize_matrices(tuple(patch.shape[-2:]), tuple(middle), tuple(size))
    device = patch.device
    exp_sum(patch, rows.to(device), columns.to(device), scale, reduced.peak, reduced.total)
