"""The CPU kernel of the dense post-processing (``ovss_ros/core/methods/dense/fused.py``) on its
own: its resize geometry against the library's, its exp, ties, banned classes, threads, odd
grids; and that ``postprocess`` takes it exactly where it applies. Against the whole softmax of
a real model's frames: test_postprocess_pruned.py (``cpu-kernel`` cases)."""

import logging
import threading

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from test_postprocess_pruned import two_resizes

from ovss_ros.core import EngineConfig, Segmenter, Stopped
from ovss_ros.core.methods.dense import fused
from ovss_ros.core.methods.dense.separable import resize_matrices

ULPS = 1e-6  # relative: about 8 float32 ulps (products summed in another order)
BANDS = {(12, 16): 4, (10, 30): 20, (1, 1): 4}  # else 8
GEOMETRIES = {  # patch grid, window / resized image, input
    "camera": ((14, 19), (224, 304), (240, 320)),  # ~17 pixels a cell: bands of 8 columns
    "large": ((12, 16), (192, 256), (600, 800)),  # 50 pixels a cell: bands of 4
    "same": ((10, 15), (160, 240), (160, 240)),
    "smaller": ((10, 14), (160, 231), (90, 130)),
    "narrow": ((10, 30), (160, 480), (90, 100)),  # a block reads > 8 columns: the slow loop
    "tall": ((33, 10), (528, 160), (260, 90)),
    "one-cell": ((1, 1), (16, 16), (5, 9)),  # a grid narrower than the band: padded
}


def float32_formula(logits, classes, middle, size, scale):
    """Today's maps (two float32 ``F.interpolate``, scaled), reduced in float64: best class
    value and query (first maximum wins), best background word, log-sum-exp."""
    maps = (two_resizes(logits, middle, size) * scale).double()
    best, query = maps[:classes].max(dim=0)
    words = maps[classes:].amax(dim=0) if classes < len(maps) else None
    return best, query, words, torch.logsumexp(maps, dim=0)


def top_two_gap(logits, classes, middle, size, scale):
    """(H, W) the best class value less the second best, of today's maps."""
    top = (two_resizes(logits[:classes], middle, size) * scale).double().topk(2, dim=0).values
    return top[0] - top[1]


def smooth_logits(queries, grid, seed):
    generator = torch.Generator().manual_seed(seed)
    return 0.2 + 0.05 * torch.randn((queries, *grid), generator=generator)


@pytest.mark.parametrize(("grid", "middle", "size"), GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_the_geometry_is_the_resize_chain(grid, middle, size):
    """Row taps and column bands rebuilt into matrices are ``resize_matrices`` (itself checked
    against the two resizes in test_postprocess_pruned.py), every weight in place."""
    taps, weights, starts, bands = fused._geometry(grid, middle, size)
    rows = np.zeros((size[0], grid[0]), np.float32)
    for y in range(size[0]):
        np.add.at(rows[y], taps[y], weights[y])
    columns = np.zeros((size[1], max(grid[1], bands.shape[1])), np.float32)
    for block, start in enumerate(starts):
        first = block * fused.BLOCK
        part = bands[block, :, : min(fused.BLOCK, size[1] - first)]  # (band, block's columns)
        columns[first : first + part.shape[1], start : start + part.shape[0]] += part.T
    assert bands.shape[1] == BANDS.get(grid, 8)  # each of the kernel's three loops is tested
    want_rows, want_columns = resize_matrices(grid, middle, size)
    np.testing.assert_array_equal(rows, want_rows.numpy())
    np.testing.assert_array_equal(columns[:, : grid[1]], want_columns.numpy())
    assert not columns[:, grid[1] :].any()


@pytest.mark.parametrize(("grid", "middle", "size"), GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_the_kernel_is_the_formula(grid, middle, size):
    """120 queries (the last 3 background words), logit scale 100: maps within a few float32
    ulps of today's, labels equal but where two values are that close, confidence within
    2e-5 relative of the float64 softmax of today's maps (scaled logits of ~20: a few ulps are
    ~1e-5, and each exp term moves by as much; measured up to 1.2e-5)."""
    logits = smooth_logits(120, grid, 1)
    logits[3, 0, 0] += 0.5  # query 3 wins there
    logits[7] = logits[3]  # an exact tie: the first query wins
    reduced = fused.reduce(logits, 117, middle, size, 100.0)
    best, query, words, lse = float32_formula(logits, 117, middle, size, 100.0)
    torch.testing.assert_close(reduced.best.double(), best, rtol=ULPS, atol=0)
    torch.testing.assert_close(reduced.background.double(), words, rtol=ULPS, atol=0)
    assert torch.equal(reduced.peak, torch.maximum(reduced.best, reduced.background))
    confidence = torch.exp(reduced.best - reduced.peak) / reduced.total
    torch.testing.assert_close(confidence.double(), torch.exp(best - lse), rtol=2e-5, atol=0)
    differ = reduced.best_query.long() != query
    assert (top_two_gap(logits, 117, middle, size, 100.0)[differ] <= 2 * ULPS * best[differ]).all()
    assert differ.float().mean() <= 1e-3
    assert (query == 3).any() and not (reduced.best_query == 7).any()


def test_exp_is_within_two_ulps():
    """Two constant maps ``gap`` apart: total = 1 + exp(-gap), over the float32 range (below
    -87 the kernel's term is about 1e-38: nothing next to the peak's 1)."""
    gaps = [1e-6, 2.5, 7.0, 20.0, 50.0, 86.9, 87.5, 200.0] + np.linspace(0, 1.5, 61).tolist()
    for gap in gaps:  # densely over n = 0, -1, -2: the polynomial's whole range
        logits = torch.zeros(2, 3, 4)
        logits[1] -= gap
        reduced = fused.reduce(logits, 2, (24, 32), (10, 13), 1.0)
        want = 1.0 + np.exp(-gap)
        assert np.allclose(reduced.total.numpy(), want, rtol=2.5e-7, atol=0), gap
        assert (reduced.best_query == 0).all() and (reduced.peak == 0).all()


def test_banned_classes_never_win_and_still_count():
    """``allowed``: a banned query is never chosen, but the second pass keeps the first pass's
    peak and total (its probability counts in the denominator, as SCLIP's area threshold)."""
    logits = smooth_logits(40, (6, 8), 3)
    reduced = fused.reduce(logits, 40, (96, 128), (70, 90), 40.0)
    peak, total = reduced.peak.clone(), reduced.total.clone()
    winners = reduced.best_query.unique()
    allowed = torch.ones(40, dtype=torch.bool)
    allowed[winners[:2].long()] = False
    fused.reduce(logits, 40, (96, 128), (70, 90), 40.0, allowed, reduced)
    assert not (~allowed)[reduced.best_query.long()].any()
    assert torch.equal(reduced.peak, peak) and torch.equal(reduced.total, total)
    kept = int(allowed.sum())
    best = float32_formula(logits[allowed], kept, (96, 128), (70, 90), 40.0)[0]
    torch.testing.assert_close(reduced.best.double(), best, rtol=ULPS, atol=0)
    nothing = torch.zeros(40, dtype=torch.bool)
    first = fused.reduce(logits, 40, (96, 128), (70, 90), 40.0)
    none = fused.reduce(logits, 40, (96, 128), (70, 90), 40.0, nothing, first)
    assert (none.best == fused._NONE).all()
    # without the first pass, the peak and denominator would be the allowed classes' alone
    with pytest.raises(ValueError, match="allowed needs reduced"):
        fused.reduce(logits, 40, (96, 128), (70, 90), 40.0, allowed)


def test_a_banned_dominant_class_neither_wins_nor_sets_the_bar():
    """Query 0 is far above every other everywhere and banned: the second pass must pick the
    best of the others (the candidates' bar comes only from allowed queries)."""
    logits = smooth_logits(30, (6, 8), 7)
    logits[0] += 5.0
    reduced = fused.reduce(logits, 30, (96, 128), (70, 90), 40.0)
    assert (reduced.best_query == 0).all()
    allowed = torch.ones(30, dtype=torch.bool)
    allowed[0] = False
    fused.reduce(logits, 30, (96, 128), (70, 90), 40.0, allowed, reduced)
    best, query, _, _ = float32_formula(logits[1:], 29, (96, 128), (70, 90), 40.0)
    torch.testing.assert_close(reduced.best.double(), best, rtol=ULPS, atol=0)
    assert (
        (reduced.best_query.long() == query + 1)
        | (top_two_gap(logits[1:], 29, (96, 128), (70, 90), 40.0) <= 2 * ULPS * best.abs())
    ).all()


def test_most_queries_pruned_in_every_block():
    """Classes apart (offsets twice their spatial spread): each block has a few candidates;
    labels and values still the formula's."""
    logits = smooth_logits(400, (14, 19), 8) + 0.1 * torch.randn(
        (400, 1, 1), generator=torch.Generator().manual_seed(8)
    )
    reduced = fused.reduce(logits, 400, (224, 304), (240, 320), 40.0)
    best, query, _, lse = float32_formula(logits, 400, (224, 304), (240, 320), 40.0)
    torch.testing.assert_close(reduced.best.double(), best, rtol=ULPS, atol=0)
    differ = reduced.best_query.long() != query
    assert (
        top_two_gap(logits, 400, (224, 304), (240, 320), 40.0)[differ]
        <= 2 * ULPS * best[differ].abs()
    ).all()
    confidence = torch.exp(reduced.best - reduced.peak) / reduced.total
    torch.testing.assert_close(confidence.double(), torch.exp(best - lse), rtol=2e-5, atol=0)
    assert 1 < len(query.unique()) < 40


class CountingStop:
    """A stop event that is set after its ``limit``-th look, noting who looked."""

    def __init__(self, limit: int) -> None:
        self.limit, self.threads = limit, []

    def is_set(self) -> bool:
        self.threads.append(threading.current_thread())
        return len(self.threads) > self.limit


def test_stop_is_checked_between_bands_by_daemon_threads(monkeypatch):
    """A 12 MP frame runs in bands of rows; a stop seen after 3 looks ends it early (Stopped),
    and the helper threads are daemons (a process may exit while one runs)."""
    monkeypatch.setattr(fused, "BAND_PAIRS", 1 << 18)
    logits = smooth_logits(20, (28, 37), 9)
    stop = CountingStop(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Stopped, match="postprocess rows"):
            fused.reduce(logits, 20, (448, 597), (3000, 4000), 40.0, stop=stop)
    finally:
        torch.set_num_threads(threads)
    bands = 3000 // ((1 << 18) // (4000 * 20))
    assert len(stop.threads) < 10 < bands  # each thread looks once more, then returns
    helpers = {t for t in stop.threads if t is not threading.current_thread()}
    assert helpers and all(t.daemon for t in helpers)
    unstopped = fused.reduce(logits, 20, (448, 597), (300, 400), 40.0, stop=CountingStop(10**9))
    assert np.isfinite(unstopped.total.numpy()).all()


def test_the_kernel_compiles_without_a_disk_cache(caplog):
    """Where numba cannot cache (here: code without a file, as a read-only install and home
    give), the kernel is compiled for the process, with a warning, not refused."""
    namespace = {}
    exec("def double(x):\n    return 2 * x\n", namespace)  # noqa: S102  (no file: no cache)
    with caplog.at_level(logging.WARNING):
        compiled = fused._jit(namespace["double"])
    assert compiled(21) == 42
    assert "NUMBA_CACHE_DIR" in caplog.text


def test_threads_split_rows_without_changing_a_bit():
    logits = smooth_logits(64, (12, 16), 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.reduce(logits, 60, (192, 256), (300, 400), 40.0)
        torch.set_num_threads(2)
        two = fused.reduce(logits, 60, (192, 256), (300, 400), 40.0)
    finally:
        torch.set_num_threads(threads)
    for name in ("peak", "total", "best", "best_query", "background"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_bad_cell_stays_in_its_support(bad):
    """A non-finite patch logit (a broken model) is clamped to +-1e30 (NaN: -1e30): every
    output is finite, and pixels beyond the cell's support (2 cells) are as without it."""
    logits = smooth_logits(20, (10, 12), 5)
    broken = logits.clone()
    broken[3, 2, 2] = bad
    good = fused.reduce(logits, 18, (160, 192), (80, 96), 40.0)
    got = fused.reduce(broken, 18, (160, 192), (80, 96), 40.0)
    far = torch.ones(80, 96, dtype=torch.bool)
    far[: 5 * 8, : 5 * 8] = False  # cells 0..4 of 8x8 pixels: the cell (2, 2) +- 2
    for name in ("peak", "total", "best", "best_query", "background"):
        value = getattr(got, name)
        assert torch.isfinite(value.float()).all(), name
        assert torch.equal(value[far], getattr(good, name)[far]), name


def test_a_wrong_geometry_fails_the_formula(monkeypatch):
    """The formula check can fail: rows in reverse order give other labels and values."""
    geometry = fused._geometry.__wrapped__

    def reversed_rows(*args):
        taps, weights, starts, bands = geometry(*args)
        return taps[::-1].copy(), weights[::-1].copy(), starts, bands

    monkeypatch.setattr(fused, "_geometry", reversed_rows)
    logits = smooth_logits(30, (10, 14), 6)
    reduced = fused.reduce(logits, 30, (160, 231), (90, 130), 40.0)
    best, query, _, _ = float32_formula(logits, 30, (160, 231), (90, 130), 40.0)
    assert (reduced.best_query.long() != query).float().mean() > 0.1
    assert not torch.allclose(reduced.best.double(), best, rtol=ULPS, atol=0)


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    config = EngineConfig(model=str(TINY_VIT), pretrained="none", device="cpu", short_side=160)
    engine = Segmenter(config)
    engine.set_classes(["cat", "dog; puppy", "tree"])
    return engine


@pytest.mark.parametrize(
    ("settings", "kernel"),
    [
        ({}, True),
        ({"dense.area_threshold": 0.1}, True),
        ({"dense.upsample": "jbu"}, False),
        ({"dense.pamr": True}, False),
        ({"dense.crop": 64}, False),  # sliding windows: the mean over windows (``_reduce``)
        ({"refinement": "freecp"}, False),
    ],
    ids=["default", "area", "jbu", "pamr", "windows", "freecp"],
)
def test_postprocess_takes_the_kernel_where_it_applies(
    segmenter, voc_rgb, monkeypatch, settings, kernel
):
    calls = []
    reduce = fused.reduce
    monkeypatch.setattr(fused, "reduce", lambda *a, **k: calls.append(a) or reduce(*a, **k))
    base = {name: segmenter.config.flat()[name] for name in settings}
    segmenter.reconfigure(**settings)
    try:
        result = segmenter.segment(voc_rgb[0])
    finally:
        segmenter.reconfigure(**base)
    assert bool(calls) == kernel
    assert result.labels.shape == voc_rgb[0].shape[:2]
