"""``core.word_segmentation``: one image segmented for words of its own (the node's
``~/segment``), on the Segmenter's loaded models, leaving its vocabulary alone.

Checked per method family (dense modes, a proposal pipeline): the answer is the one the
Segmenter gives with those words as its vocabulary, and the Segmenter's own vocabulary, method
and outputs are exactly what they were; words it cannot take are refused before encoding.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import TINY_VIT

from ovss_ros.core import EngineConfig, Segmenter, VocabularyError, parse_classes
from ovss_ros.core.word_segmentation import check_words, segment_with_words

STREAM = ["person", "tv; television"]
WORDS = ["sky", "dog | a furry pet that barks", "grass; lawn"]


def make_segmenter(method: str) -> Segmenter:
    torch.manual_seed(0)
    config = EngineConfig(
        model=str(TINY_VIT),
        pretrained="none",
        device="cpu",
        short_side=64,
        templates="a {}.|a photo of a {}.",
        background_words=("wall",),
        method=method,
    )
    segmenter = Segmenter(config, stop=threading.Event())
    segmenter.set_classes(STREAM)
    return segmenter


@pytest.mark.parametrize("method", ["naclip", "sclip", "superpixel_clip"])
def test_the_words_answer_as_a_vocabulary_would_and_the_stream_is_untouched(method, voc_rgb):
    segmenter = make_segmenter(method)
    rgb = voc_rgb[0][:96, :128].copy()
    method_before, classes_before = segmenter.method, list(segmenter.classes)
    stream_before = segmenter.segment(rgb)

    answer = segment_with_words(segmenter, rgb, parse_classes(WORDS))

    assert answer.class_names == ["sky", "dog", "grass"]
    assert answer.labels.shape == rgb.shape[:2] and answer.confidence.shape == rgb.shape[:2]
    # The Segmenter's vocabulary and method in force: the same, and so are its frames.
    assert segmenter.method is method_before and segmenter.classes == classes_before
    stream_after = segmenter.segment(rgb)
    assert stream_after.class_names == ["person", "tv"]
    np.testing.assert_array_equal(stream_after.labels, stream_before.labels)
    np.testing.assert_allclose(stream_after.confidence, stream_before.confidence, atol=1e-6)
    # The words as the vocabulary in force give the same answer.
    segmenter.set_classes(WORDS)
    expected = segmenter.segment(rgb)
    np.testing.assert_array_equal(answer.labels, expected.labels)
    np.testing.assert_allclose(answer.confidence, expected.confidence, atol=1e-6)


@pytest.mark.parametrize(
    "words, reason",
    [
        ([], "no words"),
        ([" ".join(["x"] * 95)], "token"),  # beyond CLIP's 77 text positions
    ],
)
def test_words_it_cannot_take_are_refused_before_encoding(words, reason):
    segmenter = make_segmenter("naclip")
    cached = len(segmenter.text.cache)
    classes = parse_classes(words) if words else []
    with pytest.raises(VocabularyError, match=reason):
        check_words(segmenter, classes)
    with pytest.raises(VocabularyError, match=reason):
        segment_with_words(segmenter, np.zeros((8, 8, 3), np.uint8), classes)
    assert len(segmenter.text.cache) == cached
