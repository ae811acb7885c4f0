"""The pruned post-processing (full-resolution argmax work only for the queries that can win,
one pass for the softmax's denominator) against the whole softmax written out from the formula.

Random patch logits are fed straight into ``postprocess`` (1250 class queries, synonyms, background
words, ties, spikes at the edge of a pixel's support), for bilinear, JBU and PAMR, score and area
thresholds, input frames larger and smaller than the network input. The reference brings every
query's map to the input size at once (the same ``_to_input`` ops), scales them, takes the
argmax over class queries (first maximum wins) and the softmax in float64. Labels must be equal;
confidence within ``RTOL`` = 1e-6 relative (float32 exp and summation of 1253 terms).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense import candidates
from ovss_ros.core.methods.dense.candidates import candidate_queries, support_radius

RTOL = 1e-6
CLASSES = 1000  # every fourth with a synonym: 1250 class queries


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


def formula(method, encoded, logits, size):
    """(labels, confidence) of the whole softmax at once, from the formula (docstring)."""
    config, owner = method.config, method._query_owner
    classes, class_queries = len(method.classes), method._class_queries
    affinity = method._pamr_affinity(encoded, size) if config.dense.pamr else None
    scaled = method._to_input(logits, encoded, size, True, affinity) * config.dense.logit_scale
    probs = torch.softmax(scaled.double(), dim=0)
    banned = torch.zeros(class_queries, dtype=torch.bool)
    for _ in range(2):  # SCLIP's area threshold: drop small classes once, decide again
        candidates = scaled[:class_queries].masked_fill(banned.view(-1, 1, 1), float("-inf"))
        best, query = candidates.max(dim=0)
        background = scaled[class_queries:].amax(dim=0) > best
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
    return labels.masked_fill(rejected, 65535).numpy(), confidence.float().numpy()


def random_logits(method, encoded, seed, spread=0.05):
    """(1, Q, h, w) smooth random logits plus spikes and ties."""
    generator = torch.Generator().manual_seed(seed)
    queries = method._text_embeddings.shape[0]
    h, w = encoded.dense.features.shape[1:3]
    coarse = torch.randn((1, queries, max(h // 3, 1), max(w // 3, 1)), generator=generator)
    logits = F.interpolate(coarse, (h, w), mode="bilinear") * spread + 0.2
    logits += torch.randn((1, queries, h, w), generator=generator) * spread / 4
    for _ in range(20):  # single-patch spikes: a class that wins only at its spike
        q, y, x = (int(torch.randint(n, (1,), generator=generator)) for n in (queries, h, w))
        logits[0, q, y, x] += 4 * spread
    logits[0, 700] = logits[0, 9]  # an exact tie between two classes: the first query wins
    logits[0, 1200] = logits[0, 20]
    return logits


LARGER, SMALLER, TALL = (331, 419), (90, 130), (400, 120)
CASES = {  # settings, input (H, W); PAMR on 1253 full-size maps is slow: smaller frames there
    "bilinear-larger": ({}, LARGER),
    "bilinear-smaller": ({}, SMALLER),
    "bilinear-tall": ({}, TALL),
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


@pytest.mark.parametrize(("settings", "shape"), CASES.values(), ids=CASES.keys())
def test_pruned_postprocess_equals_the_formula(wide, voc_rgb, settings, shape):
    rgb = np.ascontiguousarray(
        F.interpolate(
            torch.from_numpy(voc_rgb[2]).permute(2, 0, 1)[None].float(), shape, mode="bilinear"
        )[0]
        .permute(1, 2, 0)
        .clamp(0, 255)
        .byte()
        .numpy()
    )
    base = {name: wide.config.flat()[name] for name in settings}
    wide.reconfigure(**settings)
    try:
        method = wide.method
        with torch.inference_mode():
            encoded = method.encode(method.preprocess(rgb))
            for seed in range(2):
                logits = random_logits(method, encoded, seed)
                want_labels, want_confidence = formula(method, encoded, logits, shape)
                got = method.postprocess(encoded, logits, None, shape)
                np.testing.assert_array_equal(got.labels, want_labels)
                np.testing.assert_allclose(got.confidence, want_confidence, rtol=RTOL, atol=0)
                assert len(np.unique(got.labels)) > 5  # not a trivial map
    finally:
        wide.reconfigure(**base)


@pytest.mark.parametrize("chunk", [1, 1000])
def test_ties_go_to_the_first_query(wide, voc_rgb, monkeypatch, chunk):
    """Two classes with the same logits everywhere: the first labels every pixel it wins, also
    when they are in different chunks of queries."""
    method, rgb = wide.method, voc_rgb[0]
    monkeypatch.setattr(method, "_chunk", lambda encoded, size: chunk)
    with torch.inference_mode():
        encoded = method.encode(method.preprocess(rgb))
        logits = random_logits(method, encoded, 3) * 0
        logits[0, 5] += 1.0
        logits[0, 600] += 1.0  # owner 480, a later class, equal everywhere
        got = method.postprocess(encoded, logits, None, rgb.shape[:2])
    owner = int(method._query_owner[5])
    assert (got.labels == owner).all()


def test_pruning_drops_most_queries_and_keeps_every_winner(wide, voc_rgb):
    """The candidates are a small part of 1250 class queries, and they hold the argmax of the
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
    method, rgb = wide.method, voc_rgb[2]
    monkeypatch.setattr("ovss_ros.core.methods.dense.postprocess.support_radius", lambda *args: 0)
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
