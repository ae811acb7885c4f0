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


NEW_TEMPLATES = "a photo of the {}.|{} in a picture."


def encoding_hook(segmenter: Segmenter, when, action) -> None:
    """Run ``action`` once, inside the shared text encoder's forward, the first time its
    prompts satisfy ``when``: the other thread (the worker's commit, the change encoder)
    acting while this encoding is under way, deterministically on one thread."""
    encode, done = segmenter.text.encode_prompts, []

    def hooked(prompts):
        if not done and when(prompts):
            done.append(True)
            action()
        return encode(prompts)

    segmenter.text.encode_prompts = hooked


@pytest.mark.parametrize("method", ["naclip", "sclip"])
def test_a_change_committed_while_the_words_encode_stays_in_force(method, voc_rgb):
    # The words' copy is built for the templates in force when it began; new templates put in
    # force meanwhile (the worker's commit) must stay the encoder's: the copy once set its own
    # templates on the shared encoder, putting the old ones back under the streaming method.
    from ovss_ros.core.clip.templates import template_set
    from ovss_ros.core.word_segmentation import prepare_words

    segmenter = make_segmenter(method)
    rgb = voc_rgb[0][:96, :128].copy()
    encoding_hook(
        segmenter,
        lambda prompts: any("barks" in p for p in prompts),  # the description, encoded last
        lambda: segmenter.reconfigure(templates=NEW_TEMPLATES),
    )
    try:
        prepare_words(segmenter, parse_classes(WORDS))
    except KeyError:
        pass  # its cached entries for the old templates left with them: prepared again
    assert segmenter.text.templates == template_set(NEW_TEMPLATES)
    reference = make_segmenter(method)
    reference.reconfigure(templates=NEW_TEMPLATES)
    # A change back to the old templates re-encodes the stream's queries.
    segmenter.reconfigure(templates="a {}.|a photo of a {}.")
    reference.reconfigure(templates="a {}.|a photo of a {}.")
    got, expected = segmenter.segment(rgb), reference.segment(rgb)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_allclose(got.confidence, expected.confidence, atol=1e-5)


def test_words_encoded_while_a_pipeline_change_encodes_leave_its_templates(voc_rgb):
    # A pipeline change with new templates is being prepared (change encoder) while a request's
    # words are prepared with the templates in force (words thread): the change must encode
    # and commit with its own templates.
    from ovss_ros.core.clip.templates import template_set
    from ovss_ros.core.word_segmentation import prepare_words

    segmenter = make_segmenter("superpixel_clip")
    rgb = voc_rgb[0][:96, :128].copy()
    encoding_hook(
        segmenter,
        lambda prompts: any("person" in p for p in prompts),
        lambda: prepare_words(segmenter, parse_classes(WORDS)),
    )
    segmenter.text.cache.clear()  # the change encodes the stream's words again
    segmenter.reconfigure(templates=NEW_TEMPLATES)
    assert segmenter.text.templates == template_set(NEW_TEMPLATES)
    reference = make_segmenter("superpixel_clip")
    reference.reconfigure(templates=NEW_TEMPLATES)
    got, expected = segmenter.segment(rgb), reference.segment(rgb)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_allclose(got.confidence, expected.confidence, atol=1e-5)


@pytest.mark.parametrize("method", ["naclip", "superpixel_clip"])
def test_a_failed_words_encoding_leaves_the_shared_cache_alone(method, monkeypatch):
    """A failure while the words encode must not trim the text cache (``Segmenter._attempt``
    does for a change of its own): the trim replaces the cache that a change being encoded on
    the change encoder's thread is filling at the same time."""
    from ovss_ros.core.clip import text_encoding
    from ovss_ros.core.word_segmentation import prepare_words

    segmenter = make_segmenter(method)
    monkeypatch.setattr(text_encoding, "CACHE_LIMIT", 0)  # any cache is over the limit
    cache, entries = segmenter.text.cache, dict(segmenter.text.cache)
    assert entries

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(segmenter.text, "encode_prompts", out_of_memory)
    with pytest.raises(RuntimeError, match="injected"):
        prepare_words(segmenter, parse_classes(WORDS))
    assert segmenter.text.cache is cache and cache == entries


def test_the_generation_is_new_before_a_commit_swaps_anything():
    """The words' preparation retries a failure only if a change was put in force meanwhile
    (the generation differs): a failure on what a commit swaps (the text cache) while the
    commit runs must already see the new generation."""
    segmenter = make_segmenter("naclip")
    prepared = segmenter.prepare_update(parse_classes(WORDS), {"templates": "single"})
    seen, commit = [], prepared.change.commit

    def observed() -> None:
        seen.append(segmenter.generation)
        commit()

    prepared.change.commit = observed
    before = segmenter.generation
    segmenter.commit(prepared)
    assert seen == [before + 1] and segmenter.generation == before + 1
