"""The dense family's labels and softmax on the CPU in one pass over the pixels (numba kernel).

For one window, bilinear upsampling and no PAMR (the default), the two resizes of
``DensePostprocess._to_input`` are one linear map per axis (``separable.resize_matrices``: the
library's own coefficients, each output row or column a convex combination of a few patch rows
or columns). ``reduce`` runs it for every query and pixel and reduces on the spot, never
writing a full-size map:

1. per output row y: R (Q, w) = the row's taps (2-4 patch rows) x the scaled patch logits;
2. per block of ``BLOCK`` output columns: V (Q, BLOCK) = R's band of columns (4 or 8; more
   where the frame is narrower than the network input) x the block's weights, in the cache;
3. the block's candidates from patch-grid bounds (``candidates.py``'s argument, per block: a
   query whose largest logit in the block's support is below another allowed query's smallest
   cannot win there): the best class query over them (the first maximum wins, as ``argmax``),
   the best background word, ``peak`` = the larger (the maximum over all queries);
4. ``total`` = sum over all queries of exp(V - peak), exp in float32 by Cephes' ``expf``
   (range reduction by ln 2, degree-7 polynomial, 2^n from the exponent bits; 1-2 ulp), which
   vectorises; ``math.exp`` would not, and is the cost that matters at 1000 classes.

Exactness: each map value is the same convex combination of patch logits as the resized maps,
its products summed in another order: they differ by float32 rounding (a few ulps). So labels
equal the whole softmax's (``DensePostprocess._reduce``) except where two classes' logits are
within that rounding of each other, and the confidence is within 2e-5 relative of the float64
softmax of the resized maps at logit scales up to 100 (measured up to 3e-6 at 40, 1.2e-5 at
100: a few ulps of a scaled logit move each exp term that much, and grow with the scale, ~5e-5
at 1000; test/test_postprocess_fused.py). On CUDA, and with JBU or PAMR, the torch path
(``postprocess._reduce_pruned``) stays.

The rows go in bands of about ``BAND_PAIRS`` (query, pixel) pairs, shared by
``torch.get_num_threads()`` threads (the kernel releases the GIL): the stop event is checked
between bands (~30 ms), and the helper threads are daemons (a process may exit while they run).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import numpy as np
import torch
from numba import njit

from ovss_ros.core.methods.dense.candidates import MARGIN
from ovss_ros.core.methods.dense.reduction import Reduced
from ovss_ros.core.methods.dense.separable import resize_matrices
from ovss_ros.core.stopping import check_stop

logger = logging.getLogger(__name__)

BLOCK = 64  # output columns per block: V (Q, BLOCK) stays in the cache
BAND_PAIRS = 1 << 24  # (query, pixel) pairs of one band of rows: ~30 ms a thread, then stop?
LARGE = np.float32(1e30)  # logits are clamped to +-LARGE (NaN: -LARGE): every value is finite
_NONE = np.float32(-3e38)  # "no value yet" / "none" (background without words, all banned)
_FAST = {"reassoc", "nsz", "contract", "nnan", "ninf", "arcp"}  # vectorised sums and maxima
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 in two parts (Cody-Waite): r = t - n ln 2 exactly
_LN2_LO = np.float32(-2.12194440e-4)


def _jit(function: Callable) -> Callable:
    """numba's ``njit`` (GIL released, vectorising fast-math), its machine code cached on disk
    where numba can write (beside this module, else ``~/.cache/numba`` or ``NUMBA_CACHE_DIR``);
    where it cannot (read-only install and home), compiled once per process instead."""
    try:
        return njit(nogil=True, fastmath=_FAST, cache=True)(function)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available"
        logger.warning("%s: compiling it once per process (set NUMBA_CACHE_DIR)", error)
        return njit(nogil=True, fastmath=_FAST)(function)


@_jit
def _rows(
    scaled, upper_cells, lower_cells, row_taps, row_weights, band_starts, band_weights,
    allowed, margin, softmax, first, last, peak, total, best, best_query, background,
):  # fmt: skip
    """Output rows first..last-1 of ``reduce`` (module docstring); ``softmax`` False: only
    ``best`` / ``best_query`` (the area threshold's second pass)."""
    queries, _, width = scaled.shape
    classes = allowed.shape[0]
    out_width = peak.shape[1]
    taps, band = row_taps.shape[1], band_weights.shape[1]
    rows = np.empty((queries, width), np.float32)
    values = np.empty((queries, BLOCK), np.float32)
    top = np.empty(BLOCK, np.float32)
    top_query = np.empty(BLOCK, np.int32)
    words = np.empty(BLOCK, np.float32)
    sums = np.empty(BLOCK, np.float32)
    poly = np.empty(BLOCK, np.float32)
    exponent = np.empty(BLOCK, np.int32)
    power = exponent.view(np.float32)  # 2^n from its bits
    upper = np.empty(classes, np.float32)
    chosen = np.empty(classes, np.int32)
    for y in range(first, last):
        for q in range(queries):
            row, patch = rows[q], scaled[q]
            weight, source = row_weights[y, 0], patch[row_taps[y, 0]]
            for j in range(width):
                row[j] = weight * source[j]
            for t in range(1, taps):
                weight, source = row_weights[y, t], patch[row_taps[y, t]]
                for j in range(width):
                    row[j] += weight * source[j]
        for block in range(band_starts.shape[0]):
            start, column = block * BLOCK, band_starts[block]
            w = band_weights[block]
            for q in range(queries):  # V = band of R x column weights (zero-padded to 4 or 8)
                out, row = values[q], rows[q]
                if band == 4:
                    c0, c1, c2, c3 = row[column], row[column + 1], row[column + 2], row[column + 3]
                    for x in range(BLOCK):
                        out[x] = w[0, x] * c0 + w[1, x] * c1 + w[2, x] * c2 + w[3, x] * c3
                elif band == 8:
                    c0, c1, c2, c3 = row[column], row[column + 1], row[column + 2], row[column + 3]
                    c4, c5 = row[column + 4], row[column + 5]
                    c6, c7 = row[column + 6], row[column + 7]
                    for x in range(BLOCK):
                        out[x] = (w[0, x] * c0 + w[1, x] * c1 + w[2, x] * c2 + w[3, x] * c3) + (
                            w[4, x] * c4 + w[5, x] * c5 + w[6, x] * c6 + w[7, x] * c7
                        )
                else:  # wide bands (frames narrower than the network input): slower loop
                    for x in range(BLOCK):
                        out[x] = 0
                    for t in range(band):
                        c0, wt = row[column + t], w[t]
                        for x in range(BLOCK):
                            out[x] += wt[x] * c0
            bar = _NONE  # candidates: upper bound >= the best lower bound
            for q in range(classes):
                high, low = _NONE, -_NONE
                for t in range(taps):
                    if row_weights[y, t] != 0:
                        high = max(high, upper_cells[q, row_taps[y, t], block])
                        low = min(low, lower_cells[q, row_taps[y, t], block])
                upper[q] = high
                if allowed[q]:
                    bar = max(bar, low)
            count = 0
            for q in range(classes):
                if allowed[q] and upper[q] >= bar - margin:
                    chosen[count] = q
                    count += 1
            for x in range(BLOCK):
                top[x], top_query[x], words[x], sums[x] = _NONE, 0, _NONE, 0
            for k in range(count):  # ascending: the first maximum wins
                q = chosen[k]
                out = values[q]
                for x in range(BLOCK):
                    top_query[x] = q if out[x] > top[x] else top_query[x]
                    top[x] = max(out[x], top[x])
            end = min(start + BLOCK, out_width)
            best[y, start:end] = top[: end - start]
            best_query[y, start:end] = top_query[: end - start]
            if not softmax:
                continue
            for q in range(classes, queries):
                out = values[q]
                for x in range(BLOCK):
                    words[x] = max(words[x], out[x])
            for x in range(BLOCK):
                top[x] = max(top[x], words[x])  # the peak
            for q in range(queries):
                out = values[q]
                for x in range(BLOCK):  # exp(out - peak): Cephes expf, t >= -87 (no denormals)
                    t = max(out[x] - top[x], np.float32(-87.0))
                    n = np.int32(t * _LOG2E - np.float32(0.5))  # round(t / ln 2), t <= 0
                    r = t - np.float32(n) * _LN2_HI - np.float32(n) * _LN2_LO
                    p = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
                    p = p * r + np.float32(8.3334519073e-3)
                    p = p * r + np.float32(4.1665795894e-2)
                    p = p * r + np.float32(1.6666665459e-1)
                    p = p * r + np.float32(5.0000001201e-1)
                    poly[x] = p * r * r + r + np.float32(1.0)
                    exponent[x] = (n + np.int32(127)) << np.int32(23)
                for x in range(BLOCK):
                    sums[x] += poly[x] * power[x]
            peak[y, start:end] = top[: end - start]
            total[y, start:end] = sums[: end - start]
            background[y, start:end] = words[: end - start]


@functools.lru_cache(maxsize=8)
def _geometry(
    grid: tuple[int, int], middle: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, ...]:
    """Row taps and weights (H, taps), band starts (blocks,) and weights (blocks, 4 or 8,
    BLOCK) of the resize chain grid -> middle -> size (``resize_matrices``)."""
    rows, columns = (m.numpy() for m in resize_matrices(grid, middle, size))
    taps = max(1, int((rows != 0).sum(axis=1).max()))
    row_taps = np.zeros((size[0], taps), np.int64)
    row_weights = np.zeros((size[0], taps), np.float32)
    for y, weights in enumerate(rows):
        nonzero = np.flatnonzero(weights)
        row_taps[y, : len(nonzero)], row_weights[y, : len(nonzero)] = nonzero, weights[nonzero]
    blocks = -(-size[1] // BLOCK)
    spans = [
        np.flatnonzero(columns[b * BLOCK : (b + 1) * BLOCK].any(axis=0)) for b in range(blocks)
    ]
    span = max(s[-1] - s[0] + 1 for s in spans)
    band = 4 if span <= 4 else 8 if span <= 8 else span  # 4 and 8: unrolled in the kernel
    padded = np.zeros((max(grid[1], band), columns.shape[0]), np.float32)  # beyond grid: 0
    padded[: grid[1]] = columns.T
    band_starts = np.array([min(s[0], len(padded) - band) for s in spans], np.int64)
    band_weights = np.zeros((blocks, band, BLOCK), np.float32)
    for b, start in enumerate(band_starts):
        part = padded[start : start + band, b * BLOCK : (b + 1) * BLOCK]
        band_weights[b, :, : part.shape[1]] = part
    return row_taps, row_weights, band_starts, band_weights


def reduce(
    logits: torch.Tensor,
    class_queries: int,
    middle: tuple[int, int],
    size: tuple[int, int],
    scale: float,
    allowed: torch.Tensor | None = None,
    reduced: Reduced | None = None,
    stop: threading.Event | None = None,
) -> Reduced:
    """The single window's ``Reduced`` at the input size (module docstring).

    ``logits``: (Q, h, w) patch logits on the CPU, class queries first; ``middle``: the window
    (H', W'); ``size``: the input (H, W); ``scale``: ``logit_scale``; ``allowed``: (classes,)
    bool, the class queries that may win (None: all; all queries count in the denominator).
    With ``reduced`` (the result for the same logits), only its ``best`` and ``best_query``
    are computed again, for ``allowed`` (SCLIP's area threshold). ``best`` and ``background``
    are ``-3e38`` where nothing is allowed or there are no background words; non-finite logits
    are clamped to +-1e30 (NaN: -1e30). Raises Stopped when ``stop`` is set (checked between
    bands of rows, every ~30 ms); ValueError for ``allowed`` without ``reduced`` (the first
    pass, over every class, gives the softmax's peak and denominator)."""
    if allowed is not None and reduced is None:
        raise ValueError("fused.reduce: allowed needs reduced, the first pass over all classes")
    grid = tuple(logits.shape[-2:])
    taps, weights, starts, columns = _geometry(grid, tuple(middle), tuple(size))
    band = columns.shape[1]
    scaled = logits.detach().float() * scale
    scaled = scaled.nan_to_num(-LARGE, LARGE, -LARGE).clamp_(-LARGE, LARGE)  # finite sums
    if grid[1] < band:  # a band wider than the grid (grid under 8 columns): zero weight there
        scaled = torch.nn.functional.pad(scaled, (0, band - grid[1]))
    scaled = np.ascontiguousarray(scaled.numpy())
    cells = [scaled[:class_queries, :, s : s + band] for s in starts]
    upper = np.stack([c.max(axis=-1) for c in cells], axis=-1)  # (classes, h, blocks)
    lower = np.stack([c.min(axis=-1) for c in cells], axis=-1)
    margin = np.float32(MARGIN * float(np.abs(scaled[:class_queries]).max(initial=0.0)))
    if allowed is None:
        allowed = torch.ones(class_queries, dtype=torch.bool)
    softmax = reduced is None
    if reduced is None:
        empty = [torch.empty(size) for _ in range(4)]
        reduced = Reduced(*empty[:3], torch.empty(size, dtype=torch.int32), empty[3])
    outputs = [t.numpy() for t in (reduced.peak, reduced.total, reduced.best)]
    outputs += [reduced.best_query.numpy(), reduced.background.numpy()]
    fixed = (scaled, upper, lower, taps, weights, starts, columns, allowed.numpy(), margin)
    _run_bands(
        lambda first, last: _rows(*fixed, softmax, first, last, *outputs),
        size,
        scaled.shape[0],
        stop,
    )
    return reduced


def _run_bands(
    rows: Callable[[int, int], None],
    size: tuple[int, int],
    queries: int,
    stop: threading.Event | None,
) -> None:
    """``rows(first, last)`` over bands of rows of about ``BAND_PAIRS`` (query, pixel) pairs,
    shared by ``torch.get_num_threads()`` threads (this one and daemon helpers: a process can
    exit while they run; no pool to break in a forked child). Each checks ``stop`` between its
    bands; set, Stopped is raised once all have returned."""
    threads = max(1, torch.get_num_threads())
    height = max(1, min(BAND_PAIRS // (size[1] * queries), -(-size[0] // threads)))
    bands = [(first, min(first + height, size[0])) for first in range(0, size[0], height)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for first, last in bands[index :: len(helpers) + 1]:
                if stop is not None and stop.is_set():
                    return
                rows(first, last)
        except BaseException as error:  # noqa: BLE001  (raised on the calling thread below)
            errors.append(error)

    helpers = [
        threading.Thread(target=work, args=(index,), name="ovss_fused", daemon=True)
        for index in range(1, min(threads, len(bands)))
    ]
    for helper in helpers:
        helper.start()
    work(0)
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
    check_stop(stop, f"postprocess rows of a {size[1]}x{size[0]} frame")


def warm_up(device: torch.device) -> None:
    """On the CPU: compile the kernel, or load it from numba's cache, before the first frame
    (~5 s the first time on a machine, then ~0.4 s once per process); else nothing."""
    if device.type == "cpu":
        reduce(torch.zeros(2, 2, 2), 1, (4, 4), (3, 3), 1.0)
