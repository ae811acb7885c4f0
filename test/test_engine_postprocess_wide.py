"""The chunked postprocess with a wide vocabulary: more than 254 classes (uint16 labels, 65535
unlabeled), synonyms, background words, many chunks at the default chunk size, on every path.
Reference: the whole softmax at once (``test_engine_postprocess.reference``)."""

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from test_engine_postprocess import reference

from ovss_ros.core import EngineConfig, Segmenter
from ovss_ros.core.methods.dense import postprocess as engine


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT),
        pretrained="none",
        device="cpu",
        short_side=64,
        templates="single",
        background_words=("sky", "wall"),
    )
    segmenter = Segmenter(config)
    # 300 classes, every third with a synonym: 400 queries with the background words
    segmenter.set_classes(
        [f"thing {i}; object {i}" if i % 3 == 0 else f"thing {i}" for i in range(300)]
    )
    return segmenter


SETTINGS = {
    "whole": {},
    "windows": {"dense.crop": 32, "dense.stride": 16},
    "jbu+pamr": {"dense.upsample": "jbu", "dense.pamr": True},
    "dslo": {"refinement": "dslo"},
    "freecp": {"refinement": "freecp", "freecp.redundancy": 0.0},  # P is spread over 402
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_wide_vocabulary_in_chunks_equals_the_whole_softmax(wide, voc_rgb, monkeypatch, settings):
    rgb = voc_rgb[1]
    # at most 40 maps per chunk: at least ten chunks over the 402 queries
    monkeypatch.setattr(engine, "POSTPROCESS_ELEMENTS", 40 * rgb.shape[0] * rgb.shape[1])
    base = {name: wide.config.flat()[name] for name in settings}
    wide.reconfigure(**settings)
    try:
        with torch.inference_mode():
            encoded = wide.method.encode(wide.method.preprocess(rgb))
        assert (
            10 * wide.method._chunk(encoded, rgb.shape[:2])
            <= len(wide.method._text_embeddings)
            == 402
        )
        want_labels, want_confidence = reference(wide, rgb, unlabeled=65535)
        seg = wide.segment(rgb)
    finally:
        wide.reconfigure(**base)
    assert seg.labels.dtype == np.uint16 and seg.unlabeled == 65535
    np.testing.assert_array_equal(seg.labels, want_labels)
    np.testing.assert_allclose(seg.confidence, want_confidence, rtol=1e-5, atol=1e-6)
    assert len(np.unique(seg.labels)) > 1  # not a trivial map


def test_guide_weights_are_computed_once_per_frame(wide, voc_rgb, monkeypatch):
    """JBU's window weights and PAMR's affinity depend on the image only: each frame computes
    them once, not once per chunk of classes (ten chunks here)."""
    calls = Counter()

    def counting(name, original):
        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return counted

    for name in ("jbu_weights", "pamr_affinity"):
        monkeypatch.setattr(engine, name, counting(name, getattr(engine, name)))
    first, second = voc_rgb[1], voc_rgb[1][:, ::-1].copy()  # two frames of one size: one batch
    monkeypatch.setattr(engine, "POSTPROCESS_ELEMENTS", 40 * first.shape[0] * first.shape[1])
    wide.reconfigure({"dense.upsample": "jbu", "dense.pamr": True})
    try:
        results = wide.segment_many([first, second])
    finally:
        wide.reconfigure({"dense.upsample": "bilinear", "dense.pamr": False})
    assert calls == {"jbu_weights": 2, "pamr_affinity": 2}
    assert not np.array_equal(results[0].labels, results[1].labels)
