"""The post-processing of one window against the whole softmax written out from the formula:
the torch path (full-resolution argmax work only for the queries that can win, one pass for the
softmax's denominator) and the CPU kernel (``fused.py``: one pass over the pixels).

Random patch logits are fed straight into ``postprocess`` (250 class queries, synonyms, background
words, ties, spikes at the edge of a pixel's support), for bilinear, JBU and PAMR, score and area
thresholds, input frames larger and smaller than the network input. The reference brings every
query's map to the input size at once (the same ``_to_input`` ops), scales them, takes the
argmax over class queries (first maximum wins) and the softmax in float64. Labels must be equal
(the CPU kernel's: except where float32 rounding decides, ``TIE``); confidence within ``RTOL``
relative: the float32 running log-sum-exp over many chunks of queries
(each chunk rescales the sum) drifts by up to ~1e-5 from float64, as the whole-map chunked
``_reduce`` does at the same chunks (measured 9.5e-6 for both at logit scale 100, one thread).

The frames are small and the memory bound (``POSTPROCESS_ELEMENTS``) is shrunk to match
(``small_budget``), so every loop of the memory bound (chunks of queries, row blocks of the
denominator's GEMMs) runs many times, as 1000 classes do on a camera frame.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense import candidates, separable
from ovss_ros.core.methods.dense.candidates import candidate_queries, support_radius
from ovss_ros.core.methods.dense.separable import exp_sum, resize_matrices
from ovss_ros.core.segmentation import label_dtype

RTOL = 2e-5  # float32 log-sum-exp of many chunks (module docstring)
TIE = 1e-5  # scaled logits this close: float32 rounding decides (CPU kernel, a few ulps of ~10)
CLASSES = 200  # every fourth with a synonym: 250 class queries
BUDGET = 1 << 18  # float32 elements of a chunk: a few queries of a frame below (many chunks)


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    """The memory bound shrunk with the frames, so that the chunked loops run many times."""
    for module in ("postprocess", "separable"):
        name = f"ovss_ros.core.methods.dense.{module}.POSTPROCESS_ELEMENTS"
        monkeypatch.setattr(name, BUDGET)
    monkeypatch.setattr("ovss_ros.core.methods.dense.separable.BLOCK_ELEMENTS", BUDGET)
    monkeypatch.setattr("ovss_ros.core.methods.dense.reduction.FOLD_ELEMENTS", 1 << 14)


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT),
        pretrained="none",
        device="cpu",
        short_side=160,
        templates="single",
        background_words=("sky", "wall", "floor"),
    )
    segmenter = Segmenter(config)
    segmenter.set_classes(
        [f"thing {i}; object {i}" if i % 4 == 0 else f"thing {i}" for i in range(CLASSES)]
    )
    return segmenter


def formula(method, encoded, logits, size, margins=False):
    """(labels, confidence) of the whole softmax at once, from the formula (docstring); with
    ``margins`` also each pixel's smallest distance (H, W) between two choices that decide its
    label: best class query vs the best query of another class, vs the best background word,
    confidence vs ``score_threshold`` (scaled logit units; relative for the threshold)."""
    config, owner = method.config, method._query_owner
    classes, class_queries = len(method.classes), method._class_queries
    affinity = method._pamr_affinity(encoded, size) if config.dense.pamr else None
    scaled = method._to_input(logits, encoded, size, True, affinity) * config.dense.logit_scale
    probs = torch.softmax(scaled.double(), dim=0)
    banned = torch.zeros(class_queries, dtype=torch.bool)
    for _ in range(2):  # SCLIP's area threshold: drop small classes once, decide again
        candidates = scaled[:class_queries].masked_fill(banned.view(-1, 1, 1), float("-inf"))
        best, query = candidates.max(dim=0)
        background = scaled[class_queries:].amax(dim=0) >= best
        labels = owner[query]
        if not config.dense.area_threshold:
            break
        counts = torch.bincount(labels[~background], minlength=classes)
        dropped = counts <= config.dense.area_threshold * counts.sum()
        if not bool((dropped & (counts > 0)).any()):
            break
        banned = dropped[owner[:class_queries]]
    confidence = probs.gather(0, query[None])[0]
    if banned.all():
        confidence = torch.zeros_like(confidence)
    rejected = background | (confidence < config.score_threshold)
    unlabeled = int(np.iinfo(label_dtype(classes)).max)
    result = labels.masked_fill(rejected, unlabeled).numpy(), confidence.float().numpy()
    if not margins:
        return result
    other = scaled[:class_queries].masked_fill(
        owner[:class_queries].view(-1, 1, 1) == labels, -1e9
    )
    margin = (best - other.amax(dim=0)).double()
    if class_queries < scaled.shape[0]:
        margin = margin.minimum((best - scaled[class_queries:].amax(dim=0)).abs().double())
    if config.score_threshold > 0:
        margin = margin.minimum((confidence / config.score_threshold - 1).abs())
    return (*result, margin.numpy())


def random_logits(method, encoded, seed, spread=0.05, offsets=0.0):
    """(1, Q, h, w) smooth random logits plus spikes and ties; ``offsets``: the spread of a
    per-query constant (large: few queries can win, most go to the denominator's GEMMs)."""
    generator = torch.Generator().manual_seed(seed)
    queries = method._text_embeddings.shape[0]
    h, w = encoded.dense.features.shape[1:3]
    coarse = torch.randn((1, queries, max(h // 3, 1), max(w // 3, 1)), generator=generator)
    logits = F.interpolate(coarse, (h, w), mode="bilinear") * spread + 0.2
    logits += offsets * torch.randn((1, queries, 1, 1), generator=generator)
    logits += torch.randn((1, queries, h, w), generator=generator) * spread / 4
    for _ in range(20):  # single-patch spikes: a class that wins only at its spike
        q, y, x = (int(torch.randint(n, (1,), generator=generator)) for n in (queries, h, w))
        logits[0, q, y, x] += 4 * spread
    logits[0, 140] = logits[0, 9]  # an exact tie between two classes: the first query wins
    logits[0, 240] = logits[0, 20]
    return logits


LARGER, SMALLER, TALL = (197, 263), (90, 130), (260, 90)
SAME, ODD = (160, 240), (97, 333)  # the network input's own size; odd, wide and small
CASES = {  # settings, input (H, W); PAMR on 253 full-size maps is slow: smaller frames there
    "bilinear-larger": ({}, LARGER),
    "bilinear-smaller": ({}, SMALLER),
    "bilinear-tall": ({}, TALL),
    "bilinear-same": ({}, SAME),
    "bilinear-odd": ({}, ODD),
    "threshold": ({"score_threshold": 0.002}, LARGER),
    "area": ({"dense.area_threshold": 0.02}, TALL),
    "jbu-larger": ({"dense.upsample": "jbu"}, LARGER),
    "jbu-smaller": ({"dense.upsample": "jbu"}, SMALLER),
    "pamr": ({"dense.pamr": True}, SMALLER),
    "jbu+pamr+area": (
        {"dense.upsample": "jbu", "dense.pamr": True, "dense.area_threshold": 0.03},
        (120, 100),
    ),
    "scale100": ({"dense.logit_scale": 100.0}, LARGER),
}


def resized(image, shape):
    """A VOC image (H, W, 3) uint8 resized to ``shape``."""
    chw = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    hwc = F.interpolate(chw, shape, mode="bilinear")[0].permute(1, 2, 0)
    return np.ascontiguousarray(hwc.clamp(0, 255).byte().numpy())


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "cpu-kernel"])
@pytest.mark.parametrize(("settings", "shape"), CASES.values(), ids=CASES.keys())
def test_pruned_postprocess_equals_the_formula(
    wide, voc_rgb, monkeypatch, settings, shape, kernel
):
    """The torch path's labels are the formula's bits. The CPU kernel (``fused.py``; bilinear
    without PAMR, else the torch path runs) sums the same products in another order: its labels
    may differ only where two deciding values are within float rounding (``TIE``), at very few
    pixels."""
    rgb = resized(voc_rgb[2], shape)
    base = {name: wide.config.flat()[name] for name in settings}
    wide.reconfigure(**settings)
    try:
        method = wide.method
        monkeypatch.setattr(method, "cpu_kernel", kernel)
        with torch.inference_mode():
            encoded = method.encode(method.preprocess(rgb))
            for seed, offsets in ((0, 0.0), (2, 0.03)):  # many candidates; most in the GEMMs
                logits = random_logits(method, encoded, seed, offsets=offsets)
                labels, confidence, margin = formula(method, encoded, logits, shape, True)
                got = method.postprocess(encoded, logits, None, shape)
                differ = got.labels != labels
                if kernel:
                    assert (margin[differ] <= TIE).all(), margin[differ].max()
                    assert differ.sum() <= 1e-3 * differ.size
                else:
                    assert not differ.any()
                np.testing.assert_allclose(got.confidence, confidence, rtol=RTOL, atol=0)
                assert len(np.unique(got.labels)) > 5  # not a trivial map
    finally:
        wide.reconfigure(**base)


@pytest.mark.parametrize("chunk", [1, 300])
def test_ties_go_to_the_first_query(wide, voc_rgb, monkeypatch, chunk):
    """Two classes with the same logits everywhere: the first labels every pixel it wins, also
    when they are in different chunks of queries."""
    method, rgb = wide.method, voc_rgb[0]
    monkeypatch.setattr(method, "_chunk", lambda encoded, size: chunk)
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(rgb))
        logits = random_logits(method, encoded, 3) * 0
        logits[0, 5] += 1.0
        logits[0, 200] += 1.0  # owner 160, a later class, equal everywhere
        got = method.postprocess(encoded, logits, None, rgb.shape[:2])
    owner = int(method._query_owner[5])
    assert (got.labels == owner).all()


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "cpu-kernel"])
def test_a_background_word_equal_to_the_best_class_leaves_the_pixel_unlabeled(
    wide, voc_rgb, monkeypatch, kernel
):
    """SCLIP's argmax runs over background (class 0) and the classes: background wins a tie.
    A background word with the logits of the class that wins a region: that region is
    unlabeled; the rest keeps its labels. Both paths (the same bits for equal inputs)."""
    method, rgb = wide.method, voc_rgb[0]
    monkeypatch.setattr(method, "cpu_kernel", kernel)
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(rgb))
        logits = random_logits(method, encoded, 3) * 0
        logits[0, 5] += 1.0  # query 5's class wins everywhere ...
        logits[0, 5, :, : logits.shape[-1] // 2] += 1.0  # ... by more on the left
        word = method._class_queries  # the first background word: equal to query 5 on the left
        logits[0, word, :, : logits.shape[-1] // 2] = logits[0, 5, :, : logits.shape[-1] // 2]
        got = method.postprocess(encoded, logits, None, rgb.shape[:2])
    unlabeled = int(np.iinfo(got.labels.dtype).max)
    width = rgb.shape[1]
    assert (got.labels[:, : width // 3] == unlabeled).all()  # left of every blend: a tie
    assert (got.labels[:, -width // 3 :] == int(method._query_owner[5])).all()


def test_pruning_drops_most_queries_and_keeps_every_winner(wide, voc_rgb):
    """The candidates are a small part of 250 class queries, and they hold the argmax of the
    full-resolution maps at every pixel (brute force, bilinear and PAMR radii)."""
    method, rgb = wide.method, voc_rgb[1]
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(rgb))
        logits = random_logits(method, encoded, 5, spread=0.01)
        offsets = torch.randn(logits.shape[1], generator=torch.Generator().manual_seed(5))
        logits += 0.05 * offsets.view(1, -1, 1, 1)  # classes differ more than they vary
        size = rgb.shape[:2]
        scaled = logits[0, : method._class_queries] * 40
        grid = tuple(logits.shape[-2:])
        chosen = candidate_queries(scaled, support_radius(size, grid, False, False))
        assert 0 < len(chosen) < method._class_queries // 4
        maps = method._to_input(logits[:, : method._class_queries], encoded, size, True, None)
        winners = torch.unique(maps.argmax(dim=0))
    assert set(winners.tolist()) <= set(chosen.tolist())


def test_a_narrow_radius_or_no_margin_would_be_wrong(wide, voc_rgb, monkeypatch):
    """The guards are needed: with radius 0 (no support beyond a pixel's own cell) the pruned
    labels differ from the formula, so the test above can fail."""
    method, rgb = wide.method, resized(voc_rgb[2], LARGER)
    monkeypatch.setattr("ovss_ros.core.methods.dense.postprocess.support_radius", lambda *args: 0)
    monkeypatch.setattr(method, "cpu_kernel", False)  # the torch path's candidates
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(rgb))
        logits = random_logits(method, encoded, 0)
        want, _ = formula(method, encoded, logits, rgb.shape[:2])
        got = method.postprocess(encoded, logits, None, rgb.shape[:2])
    assert (got.labels != want).any()
    assert candidates.MARGIN > 0


def test_banned_queries_are_never_candidates():
    scaled = torch.randn(50, 6, 7)
    banned = torch.zeros(50, dtype=torch.bool)
    banned[::2] = True
    chosen = candidate_queries(scaled, 2, banned)
    assert len(chosen) and not banned[chosen].any()
    assert len(candidate_queries(scaled, 2, torch.ones(50, dtype=torch.bool))) == 0


GEOMETRIES = {  # patch grid, window / resized image, input: larger, smaller, odd, tall, same
    "larger": ((10, 13), (160, 208), (203, 277)),
    "smaller": ((10, 14), (160, 231), (90, 130)),
    "odd": ((7, 23), (112, 368), (97, 333)),
    "tall": ((33, 10), (528, 160), (260, 90)),
    "same": ((10, 15), (160, 240), (160, 240)),
    "one-cell": ((1, 1), (16, 16), (5, 9)),
}


def two_resizes(patch, middle, size):
    """The maps (k, H, W) as ``to_image`` + ``_resize`` bring them to the input."""
    maps = F.interpolate(patch[None], size=middle, mode="bilinear", align_corners=False)
    if tuple(middle) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps[0]


@pytest.mark.parametrize(("grid", "middle", "size"), GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_resize_matrices_are_the_two_resizes(grid, middle, size):
    """A_h @ Z @ A_w^T equals the two bilinear resizes to float32 rounding; a transposed chain
    (the rows' matrix used for the columns where shapes allow, or its rows reversed) does
    not."""
    patch = torch.randn((6, *grid), generator=torch.Generator().manual_seed(1))
    rows, columns = resize_matrices(grid, middle, size)
    assert rows.shape == (size[0], grid[0]) and columns.shape == (size[1], grid[1])
    want = two_resizes(patch, middle, size)
    torch.testing.assert_close(rows @ patch @ columns.T, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(rows.sum(dim=1), torch.ones(size[0]))  # convex combinations
    if size[0] > 1 and grid[0] > 1:
        flipped = rows.flip(0) @ patch @ columns.T
        assert not torch.allclose(flipped, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("grid", "middle", "size"), GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_exp_sum_is_as_close_to_float64_as_the_resized_maps(grid, middle, size, monkeypatch):
    """``exp_sum`` of 300 queries against sum exp(scale * maps - peak) from float64 resizes,
    with blocks of a few rows and chunks of a few queries (the memory bounds' loops): its error
    is that of today's float32 path (resize, scale, exp, sum) within 1.5x, a few 1e-6 relative
    for a sum of 300 float32 terms (the confidence's own check is the formula test above)."""
    monkeypatch.setattr("ovss_ros.core.methods.dense.separable.BLOCK_ELEMENTS", 3 * size[1] * 7)
    generator = torch.Generator().manual_seed(2)
    patch = 0.2 + 0.05 * torch.randn((300, *grid), generator=generator)
    maps = two_resizes(patch.double(), middle, size) * 40.0
    peak = maps.amax(dim=0).float() + 0.5
    want = torch.exp(maps - peak.double()).sum(dim=0)
    total = torch.zeros(size)
    rows, columns = resize_matrices(grid, middle, size)
    exp_sum(patch, rows, columns, 40.0, peak, total)
    today = (two_resizes(patch, middle, size) * 40.0 - peak).exp().sum(dim=0)
    error = float(((total.double() - want).abs() / want).max())
    assert error <= 1.5 * float(((today.double() - want).abs() / want).max()) + 1e-7
    assert error < 2e-5


def test_a_wrong_denominator_matrix_fails_the_formula_check(wide, voc_rgb, monkeypatch):
    """The formula check catches a broken resize matrix in the denominator's GEMMs (rows in
    reverse order): the confidence differs, though the labels do not come from there."""

    def reversed_rows(*args):
        rows, columns = resize_matrices(*args)
        return rows.flip(0), columns

    monkeypatch.setattr(separable, "resize_matrices", reversed_rows)
    method, rgb = wide.method, resized(voc_rgb[2], LARGER)
    monkeypatch.setattr(method, "cpu_kernel", False)  # the torch path's GEMMs
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(rgb))
        logits = random_logits(method, encoded, 2, offsets=0.03)
        want_labels, want_confidence = formula(method, encoded, logits, LARGER)
        got = method.postprocess(encoded, logits, None, LARGER)
    np.testing.assert_array_equal(got.labels, want_labels)
    assert not np.allclose(got.confidence, want_confidence, rtol=RTOL, atol=0)


@pytest.mark.parametrize("radius", [0, 2, 5, 40])
def test_separable_max_pool_is_the_square_one(radius):
    """The candidates' bounds pool rows then columns: the same values as the square pool."""
    maps = torch.randn((30, 9, 14), generator=torch.Generator().manual_seed(4))
    radius_used = min(radius, 14)
    kernel = 2 * radius_used + 1
    want = F.max_pool2d(maps[None], kernel, stride=1, padding=radius_used)[0]
    assert torch.equal(candidates._max_pool(maps, kernel, radius_used), want)
